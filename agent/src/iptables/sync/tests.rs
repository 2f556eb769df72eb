use std::sync::Arc;

use super::*;
use crate::dataplane::fixtures::{cfg, ep, slice, svc};
use crate::state::HeldResource;
use switchyard_model::{Protocol, ServiceKey, ServiceState};

fn state(services: Vec<ServiceState>) -> AgentState {
    let mut s = AgentState::default();
    for svc in services {
        s.resources.insert(
            svc.service.key.to_string(),
            HeldResource {
                version: "v".into(),
                state: Arc::new(svc),
            },
        );
    }
    s
}

fn named(mut s: ServiceState, name: &str, ip: &str) -> ServiceState {
    s.service.key = ServiceKey::new("default", "shop", name);
    s.service.cluster_ips = vec![ip.parse().expect("ip")];
    s
}

fn two_services(web_eps: &[&str]) -> AgentState {
    let eps = web_eps.iter().map(|ip| ep(ip, "node-b")).collect();
    state(vec![
        named(
            svc(Protocol::Udp, vec![slice("w", Protocol::Udp, 8080, eps)]),
            "web",
            "10.96.0.10",
        ),
        named(
            svc(
                Protocol::Tcp,
                vec![slice(
                    "a",
                    Protocol::Tcp,
                    8080,
                    vec![ep("10.244.9.9", "node-b")],
                )],
            ),
            "api",
            "10.96.0.11",
        ),
    ])
}

/// The one restore input of a small partial sync.
fn one(tx: &Transaction) -> String {
    assert_eq!(tx.texts.len(), 1, "{:#?}", tx.texts);
    tx.texts[0].clone()
}

fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn full_sync_writes_everything_and_removes_leftovers() {
    let mut existing = Existing::default();
    existing.parse(
        Table::Nat,
        "*nat\n:PREROUTING ACCEPT [0:0]\n:SWY-SEP-OLD - [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
    );
    assert_eq!(existing.jumps.len(), 1);
    let (tables, restores) = FamilyTables::full_texts(
        &two_services(&["10.244.1.1"]),
        &cfg(),
        &existing,
        Family::V4,
        1000,
    );
    // Service chains, then the dispatch, then the leftovers.
    assert_eq!(restores.len(), 3, "{restores:#?}");
    let (chains, dispatch, deletes) = (&restores[0], &restores[1], &restores[2]);
    assert!(chains.starts_with("*nat\n"));
    assert!(chains.contains(":SWY-MARK-MASQ - [0:0]\n"));
    assert!(chains.contains(":SWY-SVC-"));
    assert!(!chains.contains("SWY-SERVICES"));
    let t = dispatch;
    assert_eq!(t.matches("COMMIT").count(), 2);
    assert!(t.contains(":SWY-SERVICES - [0:0]\n"));
    assert!(t.contains("-A SWY-SERVICES -d 0.0.0.10/0.0.0.255 -j SWY-SB-0A\n"));
    assert!(t.contains("-A SWY-SERVICES -d 0.0.0.11/0.0.0.255 -j SWY-SB-0B\n"));
    assert_eq!(
        deletes,
        "*nat\n:SWY-SEP-OLD - [0:0]\n-X SWY-SEP-OLD\nCOMMIT\n"
    );
    assert!(
        !restores.concat().contains("KUBE-"),
        "chains we do not own are never named"
    );
    // PREROUTING's jump exists; the others are inserted.
    assert!(!t.contains("-I PREROUTING"));
    assert!(t.contains(
        "-I OUTPUT 1 -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n"
    ));
    assert!(t.contains("-I FORWARD 1 -m conntrack --ctstate NEW"));
    assert!(tables.rule_count() > 10);
    // The nodeports jump is the last rule of SWY-SERVICES.
    let services = lines_starting(t, "-A SWY-SERVICES ");
    assert!(
        services
            .last()
            .expect("rules")
            .ends_with("-j SWY-NODEPORTS")
    );
}

#[test]
fn partial_sync_touches_only_the_changed_service() {
    let before = two_services(&["10.244.1.1", "10.244.1.2"]);
    let (mut tables, _) =
        FamilyTables::full_texts(&before, &cfg(), &Existing::default(), Family::V4, 1000);
    let rules_before = tables.rule_count();
    let after = two_services(&["10.244.1.1"]);
    let changes = ChangeSet {
        changed: vec!["default/shop/web".into()],
        removed: Vec::new(),
    };
    let tx = tables.partial(&after, &changes, &cfg(), 1000);
    let t = &one(&tx);
    assert!(
        !t.contains(":SWY-SERVICES "),
        "dispatch chain not rewritten: {t}"
    );
    assert!(
        !t.contains("10.96.0.11"),
        "the other service is not touched: {t}"
    );
    assert!(
        t.contains(":SWY-SB-0A - [0:0]\n"),
        "its bucket is rewritten"
    );
    assert_eq!(
        lines_starting(t, "-X SWY-SEP-").len(),
        1,
        "the gone endpoint's chain: {t}"
    );
    assert!(
        !t.contains("*filter"),
        "nothing changed in filter (the Service's rules there are the same): {t}"
    );
    // What stale-flow clean-up keeps follows the record.
    let frontend = Frontend::Ip("10.96.0.10:80".parse().expect("addr"));
    assert_eq!(
        tables.udp_frontends()[&frontend]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.244.1.1:8080"]
    );
    assert_eq!(
        tables.rule_count(),
        rules_before - 3,
        "one SVC rule and two SEP rules fewer"
    );

    // The last endpoint goes: the service's port moves to a REJECT in its
    // filter bucket, before the rules that refuse its unknown ports.
    let empty = two_services(&[]);
    let tx = tables.partial(&empty, &changes, &cfg(), 1000);
    assert!(one(&tx).contains("*filter\n:SWY-FB-0A - [0:0]\n"));
    assert!(
        !one(&tx).contains("-I SWY-SERVICES 1 -d 0.0.0.10/0.0.0.255 -j SWY-FB-0A\n"),
        "the filter bucket was there already"
    );
    let text = one(&tx);
    let filter_rules = lines_starting(&text, "-A SWY-FB-0A ");
    assert_eq!(filter_rules.len(), 3, "{filter_rules:?}");
    assert!(filter_rules[0].contains("--dport 80") && filter_rules[0].contains("has no endpoints"));
    assert!(filter_rules[1].contains("has no such port"));
    assert!(lines_starting(&one(&tx), "-X SWY-SVC-").len() == 1);
    // Its nat bucket is empty now: the jump and the chain go.
    assert!(one(&tx).contains("-D SWY-SERVICES -d 0.0.0.10/0.0.0.255 -j SWY-SB-0A\n"));
    assert!(one(&tx).contains("-X SWY-SB-0A\n"));
    assert!(
        tables.udp_frontends()[&frontend].is_empty(),
        "no serving endpoint: every flow of the frontend is stale"
    );
    // An endpoint comes back.
    let tx = tables.partial(&before, &changes, &cfg(), 1000);
    assert_eq!(tables.udp_frontends()[&frontend].len(), 2);
    assert_eq!(
        lines_starting(&one(&tx), "-I SWY-SERVICES"),
        vec!["-I SWY-SERVICES 1 -d 0.0.0.10/0.0.0.255 -j SWY-SB-0A"],
        "the nat bucket is back"
    );
    assert_eq!(
        lines_starting(&one(&tx), "-A SWY-FB-0A ").len(),
        2,
        "the filter bucket keeps the unknown ports' rules"
    );

    // Removal deletes its chains and empties its bucket.
    let gone = state(vec![]);
    let tx = tables.partial(
        &gone,
        &ChangeSet {
            changed: Vec::new(),
            removed: vec!["default/shop/web".into(), "default/shop/api".into()],
        },
        &cfg(),
        1000,
    );
    assert!(one(&tx).contains("-X SWY-SB-0A\n"));
    assert!(one(&tx).contains("-X SWY-SB-0B\n"));
    assert!(!one(&tx).contains("-A SWY-SB-0A"));
    let (fresh, _) =
        FamilyTables::full_texts(&gone, &cfg(), &Existing::default(), Family::V4, 1000);
    assert_eq!(tables.rule_count(), fresh.rule_count());
}

#[test]
fn cleanup_removes_our_jumps_and_chains_only() {
    let mut existing = Existing::default();
    existing.parse(
        Table::Nat,
        ":PREROUTING ACCEPT [0:0]\n:SWY-SERVICES - [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A SWY-SERVICES -j SWY-NODEPORTS\n",
    );
    let t = cleanup(&existing, 1000);
    assert_eq!(
        t,
        vec![
            "*nat\n-D PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\nCOMMIT\n",
            "*nat\n:SWY-SERVICES - [0:0]\n-X SWY-SERVICES\nCOMMIT\n",
        ]
    );
    assert!(cleanup(&Existing::default(), 1000).is_empty());
}

#[test]
fn nft_chain_listing_names_our_chains_per_table() {
    let mut existing = Existing::default();
    existing.parse_nft_chains(
        "table ip nat {\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n\tchain SWY-SERVICES {\n\t}\n\tchain DOCKER {\n\t}\n}\ntable ip filter {\n\tchain SWY-SERVICES {\n\t}\n}\ntable ip mangle {\n\tchain SWY-ODD {\n\t}\n}\n",
    );
    let chains: Vec<_> = existing.chains.iter().cloned().collect();
    assert_eq!(
        chains,
        vec![
            (Table::Nat, "SWY-SERVICES".to_owned()),
            (Table::Filter, "SWY-SERVICES".to_owned()),
        ]
    );
}

/// What iptables-restore would hold, enough to check that every input of a
/// sequence is accepted and leaves no jump to a missing chain.
#[derive(Debug, Clone, Default, PartialEq)]
struct Kernel {
    chains: BTreeMap<(Table, String), Vec<String>>,
}

fn jump_target(rule: &str) -> Option<&str> {
    rule.split(" -j ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .filter(|t| t.starts_with(PREFIX))
}

impl Kernel {
    fn restore(&mut self, text: &str) {
        let mut next = self.clone();
        let mut table = Table::Nat;
        for line in text.lines() {
            let builtin = |n: &str| !n.starts_with(PREFIX);
            if let Some(t) = line.strip_prefix('*') {
                table = Table::ALL
                    .into_iter()
                    .find(|x| x.name() == t)
                    .expect("table");
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().expect("name");
                next.chains.insert((table, name.to_owned()), Vec::new());
            } else if line == "COMMIT" {
                for ((t, c), rules) in &next.chains {
                    for r in rules {
                        if let Some(target) = jump_target(r) {
                            assert!(
                                next.chains.contains_key(&(*t, target.to_owned())),
                                "{c} jumps to missing {target} after:\n{text}"
                            );
                        }
                    }
                }
            } else {
                let (op, rest) = line.split_at(2);
                let rest = rest.trim_start();
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let key = (table, chain.to_owned());
                if builtin(chain) {
                    next.chains.entry(key.clone()).or_default();
                }
                let rules = next
                    .chains
                    .get_mut(&key)
                    .unwrap_or_else(|| panic!("{line}: no chain {chain} in:\n{text}"));
                match op {
                    "-A" => rules.push(rule.to_owned()),
                    "-I" => {
                        let rule = rule.strip_prefix("1 ").expect("position 1");
                        rules.insert(0, rule.to_owned());
                    }
                    "-D" => {
                        let at = rules
                            .iter()
                            .position(|r| r == rule)
                            .unwrap_or_else(|| panic!("{line}: no such rule"));
                        rules.remove(at);
                    }
                    "-X" => {
                        assert!(rules.is_empty(), "{line}: chain not empty");
                        next.chains.remove(&key);
                        let used = next.chains.iter().any(|((t, _), rs)| {
                            *t == table && rs.iter().any(|r| jump_target(r) == Some(chain))
                        });
                        assert!(!used, "{line}: chain still referenced in:\n{text}");
                    }
                    _ => panic!("unexpected line {line}"),
                }
            }
        }
        *self = next;
    }

    fn existing(&self) -> Existing {
        let mut e = Existing::default();
        for ((table, chain), rules) in &self.chains {
            let mut saved = format!(":{chain} - [0:0]\n");
            for r in rules {
                saved.push_str(&format!("-A {chain} {r}\n"));
            }
            e.parse(*table, &saved);
        }
        e
    }

    fn ours(&self) -> BTreeMap<(Table, String), Vec<String>> {
        self.chains
            .iter()
            .filter(|((_, c), _)| c.starts_with(PREFIX))
            .map(|(k, v)| {
                let mut v = v.clone();
                if k.1 == SERVICES {
                    // Partial syncs insert bucket jumps at the top; order
                    // among them does not matter (they match disjoint addresses).
                    v.sort();
                }
                (k.clone(), v)
            })
            .collect()
    }
}

fn many(n: usize, endpoints: usize, generation: usize) -> AgentState {
    state(
        (0..n)
            .map(|i| {
                let eps = (0..endpoints)
                    .map(|e| ep(&format!("10.244.{i}.{}", e + generation + 1), "node-b"))
                    .collect();
                named(
                    svc(Protocol::Tcp, vec![slice("s", Protocol::Tcp, 8080, eps)]),
                    &format!("svc-{i}"),
                    &format!("10.96.1.{}", i + 1),
                )
            })
            .collect(),
    )
}

#[test]
fn batched_full_syncs_keep_every_step_consistent() {
    let mut kernel = Kernel::default();
    kernel.restore("*nat\n:DOCKER - [0:0]\n-A PREROUTING -j DOCKER\nCOMMIT\n");
    let before = many(12, 3, 0);
    let (_, restores) =
        FamilyTables::full_texts(&before, &cfg(), &kernel.existing(), Family::V4, 5);
    assert!(restores.len() > 4, "split into several inputs");
    for r in &restores {
        kernel.restore(r);
    }

    // A different state over the old one: fewer Services, other endpoints,
    // so there are more leftovers than one input holds.
    let after = many(4, 2, 7);
    let (mut tables, restores) =
        FamilyTables::full_texts(&after, &cfg(), &kernel.existing(), Family::V4, 5);
    for r in &restores {
        kernel.restore(r);
    }
    let mut fresh = Kernel::default();
    for r in FamilyTables::full_texts(&after, &cfg(), &Existing::default(), Family::V4, 1000).1 {
        fresh.restore(&r);
    }
    assert_eq!(kernel.ours(), fresh.ours(), "leftovers all deleted");

    // A full sync over intact rules of the same state writes no Service
    // chain; after a flush (the canary gone) it writes them all again.
    let (_, restores) = FamilyTables::full_texts(&after, &cfg(), &kernel.existing(), Family::V4, 5);
    assert!(kernel.existing().intact());
    assert!(!restores.concat().contains(":SWY-SVC-"), "{restores:#?}");
    for r in &restores {
        kernel.restore(r);
    }
    assert_eq!(kernel.ours(), fresh.ours());
    for ((_, chain), rules) in kernel.chains.iter_mut() {
        if chain.starts_with(PREFIX) {
            rules.clear();
        }
    }
    assert!(!kernel.existing().intact());
    let (_, restores) = FamilyTables::full_texts(&after, &cfg(), &kernel.existing(), Family::V4, 5);
    for r in &restores {
        kernel.restore(r);
    }
    assert_eq!(
        kernel.ours(),
        fresh.ours(),
        "everything rewritten after a flush"
    );

    // Partial syncs land on the same rules as a full sync of the same state.
    let changed = many(4, 3, 1);
    let tx = tables.partial(
        &changed,
        &ChangeSet {
            changed: changed.resources.keys().cloned().collect(),
            removed: Vec::new(),
        },
        &cfg(),
        5,
    );
    for text in &tx.texts {
        kernel.restore(text);
    }
    let mut fresh = Kernel::default();
    for r in FamilyTables::full_texts(&changed, &cfg(), &Existing::default(), Family::V4, 1000).1 {
        fresh.restore(&r);
    }
    assert_eq!(kernel.ours(), fresh.ours());

    // Services come and go: buckets appear and empty ones disappear.
    let mut moved = many(6, 2, 3);
    moved.resources.remove("default/shop/svc-0");
    let tx = tables.partial(
        &moved,
        &ChangeSet {
            changed: moved.resources.keys().cloned().collect(),
            removed: vec!["default/shop/svc-0".into()],
        },
        &cfg(),
        5,
    );
    assert!(tx.texts.len() > 1, "a large change is split");
    assert!(
        tx.texts.concat().contains("-X SWY-SB-01\n"),
        "{:#?}",
        tx.texts
    );
    for text in &tx.texts {
        kernel.restore(text);
    }
    let services = &kernel.chains[&(Table::Nat, SERVICES.to_owned())];
    assert!(
        services
            .last()
            .is_some_and(|r| r.ends_with("-j SWY-NODEPORTS")),
        "new bucket jumps go before the node-port jump: {services:#?}"
    );
    let mut fresh = Kernel::default();
    for r in FamilyTables::full_texts(&moved, &cfg(), &Existing::default(), Family::V4, 1000).1 {
        fresh.restore(&r);
    }
    assert_eq!(kernel.ours(), fresh.ours());

    // Cleanup leaves only what is not ours.
    for r in cleanup(&kernel.existing(), 5) {
        kernel.restore(&r);
    }
    assert!(
        kernel.chains.keys().all(|(_, c)| !c.starts_with(PREFIX)),
        "{kernel:#?}"
    );
    assert_eq!(
        kernel.chains[&(Table::Nat, "PREROUTING".to_owned())],
        vec!["-j DOCKER".to_owned()]
    );
}

#[test]
fn an_interrupted_full_sync_is_not_trusted_later() {
    let mut kernel = Kernel::default();
    let s = many(12, 3, 0);
    for r in FamilyTables::full_texts(&s, &cfg(), &kernel.existing(), Family::V4, 5).1 {
        kernel.restore(&r);
    }
    let good = kernel.ours();
    // Someone flushes our chains (they stay, empty)...
    for ((_, chain), rules) in kernel.chains.iter_mut() {
        if chain.starts_with(PREFIX) {
            rules.clear();
        }
    }
    // ...and the full sync that repairs them stops after its first piece.
    let existing = kernel.existing();
    assert!(!existing.intact());
    let mut pieces = 0;
    let stopped = FamilyTables::full(&s, &cfg(), &existing, Family::V4, 5, &mut |t| {
        if pieces == 1 {
            return Err("interrupted");
        }
        pieces += 1;
        kernel.restore(&t);
        Ok(())
    });
    assert!(stopped.is_err());
    assert!(!kernel.existing().intact(), "the canaries are written last");
    // The next full sync trusts nothing and repairs everything.
    for r in FamilyTables::full_texts(&s, &cfg(), &kernel.existing(), Family::V4, 5).1 {
        kernel.restore(&r);
    }
    assert_eq!(kernel.ours(), good);
}

#[test]
fn pieces_grow_with_the_table() {
    assert_eq!(piece_limit(5, 1_000), 5, "small tables keep the given size");
    assert_eq!(piece_limit(500, 0), 500);
    assert_eq!(piece_limit(500, 24_999), 500);
    assert_eq!(piece_limit(500, 110_000), 1_048);
    assert_eq!(piece_limit(500, 1_100_000), 3_316);
    assert_eq!(
        piece_limit(5_000, 1_100_000),
        5_000,
        "never below the given size"
    );
}

#[test]
fn dispatch_rules_name_their_targets_in_descending_order() {
    // iptables-nft inserts each name into a list sorted by name, walking
    // from the smallest: descending targets cost nothing each.
    let (_, restores) =
        FamilyTables::full_texts(&many(40, 2, 0), &cfg(), &Existing::default(), Family::V4, 5);
    let dispatch = restores
        .iter()
        .find(|r| r.contains("-A SWY-SB-"))
        .expect("a dispatch transaction");
    let targets: Vec<&str> = dispatch
        .lines()
        .filter(|l| l.starts_with("-A SWY-SB-"))
        .filter_map(jump_target)
        .collect();
    assert!(targets.len() >= 40, "{targets:?}");
    assert!(targets.windows(2).all(|w| w[0] >= w[1]), "{targets:?}");
}
