//! The nftables data plane's netlink element path at a few thousand
//! Services, against the kernel itself: what the agent programs (skeleton
//! through libnftables, elements through our own netlink batches) must
//! list exactly as `nft -f` of the same elements as text does, after a
//! full sync, after changes, and after a restart from the same state (the
//! table kept, by its marker) or from another (rewritten).
//! Skipped (with a message) when not root.

use std::process::Command;

use serde_json::Value;
use switchyard_agent::dataplane::{Change, DataPlane, Family};
use switchyard_agent::nftables::NftablesDataPlane;
use switchyard_agent::nftables::elements::Programmed;
use switchyard_agent::state::{AgentState, ChangeSet};
use switchyard_integration_tests::bench::{Netns, cfg, insert, service};

/// Enough elements (46,000, some 2.5 MiB of messages) that batch boundaries and message splits
/// is crossed, small enough for CI (a few seconds).
const SERVICES: usize = 2_000;

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft"]).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("running nft");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writing to nft");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("nft output");
    assert!(
        out.status.success(),
        "nft {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our table as the kernel lists it, comparable across namespaces: rule
/// handles dropped, every set's elements sorted.
fn listing(ns: &str) -> Value {
    fn normalise(v: &mut Value) {
        match v {
            Value::Object(o) => {
                o.remove("handle");
                if let Some(Value::Array(elems)) = o.get_mut("elem") {
                    elems.sort_by_key(|e| e.to_string());
                }
                o.values_mut().for_each(normalise);
            }
            Value::Array(a) => a.iter_mut().for_each(normalise),
            _ => {}
        }
    }
    let text = nft(ns, &["-j", "list", "table", "ip", "switchyard"], None);
    let mut v: Value = serde_json::from_str(&text).expect("nft -j output is JSON");
    normalise(&mut v);
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .cloned()
        .collect()
}

/// How many elements each set and map lists.
fn counts(v: &Value) -> Vec<(String, usize)> {
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("set").or_else(|| o.get("map")))
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("?").to_owned(),
                s["elem"].as_array().map_or(0, Vec::len),
            )
        })
        .collect()
}

fn apply(dp: &mut dyn DataPlane, state: &AgentState, changed: Vec<String>, full: bool) {
    let changes = ChangeSet {
        changed,
        removed: Vec::new(),
    };
    dp.apply(&Change {
        state,
        changes: &changes,
        full,
    })
    .unwrap_or_else(|e| panic!("apply: {}", switchyard_proto::tls::chain(&e)));
}

/// The same state programmed both ways must list the same.
fn assert_same(agent: &Netns, text: &Netns, state: &AgentState, what: &str) {
    let (_, full) = Programmed::full_text(state, &cfg(), Family::V4);
    nft(&text.0, &["-f", "-"], Some(&full));
    let (got, want) = (listing(&agent.0), listing(&text.0));
    if got != want {
        let (g, w) = (counts(&got), counts(&want));
        panic!("{what}: the netlink path differs from nft -f; element counts {g:?} vs {w:?}");
    }
}

#[test]
fn thousands_of_services_list_as_nft_would_program_them_and_survive_a_restart() {
    let (Some(agent), Some(text)) = (Netns::try_new("scale-nl"), Netns::try_new("scale-txt"))
    else {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    };
    let mut state = AgentState::default();
    let names: Vec<String> = (0..SERVICES)
        .map(|i| insert(&mut state, service(i, 0)))
        .collect();
    let mut dp = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &agent.0);
    apply(&mut dp, &state, names.clone(), true);
    assert_eq!(dp.element_count(), SERVICES * 23);
    assert_same(&agent, &text, &state, "after the full sync");

    // One endpoint moved in a sample of Services, one Service's endpoint
    // count changed (a class move), one Service gone.
    let mut changed = Vec::new();
    for i in (0..SERVICES).step_by(97) {
        changed.push(insert(&mut state, service(i, 3)));
    }
    let mut fewer = service(SERVICES / 2, 0);
    fewer.slices[0].endpoints.truncate(7);
    changed.push(insert(&mut state, fewer));
    apply(&mut dp, &state, changed, false);
    let gone = names[5].clone();
    state.resources.remove(&gone);
    let changes = ChangeSet {
        changed: Vec::new(),
        removed: vec![gone],
    };
    dp.apply(&Change {
        state: &state,
        changes: &changes,
        full: false,
    })
    .expect("removing a Service");
    assert_same(&agent, &text, &state, "after partial syncs");

    // A restart: a new data plane, nothing in memory, the same state
    // (what the agent loads from sled) puts the same rules in force.
    let before = listing(&agent.0);
    drop(dp);
    let mut restarted = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &agent.0);
    let all: Vec<String> = state.resources.keys().cloned().collect();
    apply(&mut restarted, &state, all.clone(), true);
    assert!(
        restarted.kept_table(),
        "a restart over the table the same state made must keep it (its marker matches)"
    );
    assert!(
        listing(&agent.0) == before,
        "the rules after a restart differ from those before it"
    );
    // A change the agent never saw (made while it was down): the marker
    // differs, the table is rewritten to the state.
    drop(restarted);
    insert(&mut state, service(7, 5));
    let mut restarted = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &agent.0);
    apply(&mut restarted, &state, all.clone(), true);
    assert!(
        !restarted.kept_table(),
        "a start over another state's table kept it"
    );
    assert_same(
        &agent,
        &text,
        &state,
        "after a restart with a state changed meanwhile",
    );
    // A table without its marker (a sync cut short, an older build), or
    // without its rules (`nft flush chain`): rewritten too.
    for (what, damage) in [
        ("the marker gone", "flush set ip switchyard programmed"),
        ("the rules gone", "flush chain ip switchyard nat_prerouting"),
    ] {
        drop(restarted);
        nft(&agent.0, &["-f", "-"], Some(damage));
        restarted = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &agent.0);
        apply(&mut restarted, &state, all.clone(), true);
        assert!(!restarted.kept_table(), "a start kept a table with {what}");
        assert_same(
            &agent,
            &text,
            &state,
            &format!("after a restart with {what}"),
        );
    }
}
