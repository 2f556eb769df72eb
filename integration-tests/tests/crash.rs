//! Crash safety of the agent's store: a real agent process (`sy_agent`)
//! is killed with SIGKILL while it saves updates that change every
//! resource, again and again, and what it left on disk must load as
//! exactly one snapshot the control plane published: the one before the
//! update or the one after, never a mix, never discarded.
//!
//! What it catches (checked 1 Dec 2026 with temporary patches, not kept): the
//! store's old save, a batch of resources and then a separate write of the
//! version, with a 600 ms pause between the two (a slow disk; sled's flusher
//! persists the first meanwhile), failed in round 7 with new resources under
//! the old version. The one-transaction save with the same pause after its
//! commit passed (4 kills left the old state, 12 the new). Then a new
//! node is killed during its first state (written in batches, its meta
//! last), eight times: each start after finds nothing or that whole state.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchyard_agent::state::AgentState;
use switchyard_agent::store::{Loaded, Store};
use switchyard_integration_tests::*;

/// Services in the state: enough that one save takes milliseconds.
const SERVICES: usize = 1500;
/// Kills.
const ROUNDS: usize = 16;

/// Services per file (the file source reads at most 1,024 documents a file).
const PER_FILE: usize = 100;

/// Writes every Service with its endpoint at `10.{100 + flip}.x.y`: each
/// flip changes every resource.
fn write_all(env: &TestEnv, flip: usize) {
    for f in 0..SERVICES / PER_FILE {
        env.write(
            &format!("part-{f}.yaml"),
            &manifest(flip, f * PER_FILE..(f + 1) * PER_FILE),
        );
    }
}

fn manifest(flip: usize, services: std::ops::Range<usize>) -> String {
    services
        .map(|i| {
            service_yaml(
                "crash",
                &format!("svc-{i}"),
                80,
                &[&format!(
                    "10.{}.{}.{}",
                    100 + flip % 100,
                    i / 250,
                    i % 250 + 1
                )],
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn spawn_agent(url: &str, state: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sy_agent"))
        .args([
            "--control-plane",
            url,
            "--node-name",
            "crash-node",
            "--state-dir",
        ])
        .arg(state)
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "none",
            "--dataplane",
            "none",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting sy_agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_exactly_the_old_or_the_new_state() {
    let env = TestEnv::new();
    write_all(&env, 0);
    let cp = start_cp(env.cp_args()).await;
    let url = format!("http://{}", cp.grpc_addr);

    let published: Arc<Published> = Arc::default();
    {
        let published = published.clone();
        let mut rx = cp.snapshots.clone();
        tokio::spawn(async move {
            loop {
                if let Some(s) = rx.borrow_and_update().clone() {
                    let content = s
                        .resources
                        .iter()
                        .map(|(n, r)| (n.to_string(), r.version.clone()))
                        .collect();
                    published
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(s.version.clone(), content);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let state = env.state("agent");
    let started = Instant::now();
    let mut agent = spawn_agent(&url, &state);
    let first = cp_status_until(&cp, "the agent to ACK the first state", |s| {
        s.agents.iter().any(|a| {
            a.node == "crash-node" && a.acked_version.is_some() && a.acked_version == s.version
        })
    })
    .await
    .version
    .expect("version");
    let first_window = started.elapsed();

    // How long a change takes from the file to the agent's ACK: the kills
    // are spread over that window, where the save happens.
    let t = Instant::now();
    write_all(&env, 1);
    let second = cp_status_until(&cp, "the ACK of the second state", |s| {
        s.version.as_deref() != Some(first.as_str())
            && s.agents.iter().any(|a| {
                a.node == "crash-node" && a.acked_version.is_some() && a.acked_version == s.version
            })
    })
    .await
    .version
    .expect("version");
    let window = t.elapsed();
    let mut last_acked = second;

    let (mut old, mut new) = (0, 0);
    for round in 0..ROUNDS {
        write_all(&env, round + 2);
        // From just after the write to a bit past the usual ACK.
        let delay = window.mul_f64(0.3 + 1.2 * round as f64 / ROUNDS as f64);
        tokio::time::sleep(delay).await;
        let what = format!("round {round}");
        let loaded = kill_and_load(&mut agent, &state, &what, false).expect("a whole state");
        assert_published(&published, &loaded, &what);
        if loaded.version == last_acked {
            old += 1;
        } else {
            new += 1;
        }
        // Back up from what is on disk; wait for the agent to have caught
        // up before the next kill.
        agent = spawn_agent(&url, &state);
        last_acked = cp_status_until(&cp, "the restarted agent to catch up", |s| {
            s.agents.iter().any(|a| {
                a.node == "crash-node"
                    && a.connected
                    && a.acked_version.is_some()
                    && a.acked_version == s.version
            })
        })
        .await
        .version
        .expect("version");
    }
    agent.kill().expect("SIGKILL");
    let _ = agent.wait();
    eprintln!("kills that left the state before the update: {old}, after it: {new}");
    assert_eq!(old + new, ROUNDS);

    // A new node killed during its first state, which the store writes in
    // batches with its meta last: the next start finds nothing or exactly
    // a published snapshot, never a discard. The kills fall from 5% to 45%
    // of the time the first agent took to be seen ACKing (its save ends
    // at about a sixth of it: both outcomes come up). The cut between the
    // batches and the meta itself is the store's unit test's.
    let (mut empty, mut whole) = (0, 0);
    for round in 0..FIRST_ROUNDS {
        let state = env.state(&format!("first-{round}"));
        let mut agent = spawn_agent(&url, &state);
        let delay = first_window.mul_f64(0.05 + 0.4 * round as f64 / FIRST_ROUNDS as f64);
        tokio::time::sleep(delay).await;
        let what = format!("first state, round {round}");
        match kill_and_load(&mut agent, &state, &what, true) {
            None => empty += 1,
            Some(loaded) => {
                assert_published(&published, &loaded, &what);
                whole += 1;
            }
        }
    }
    eprintln!("kills during a first state that left nothing: {empty}, the whole state: {whole}");
}

/// Every snapshot the control plane published: version -> name -> resource version.
type Published = Mutex<BTreeMap<String, BTreeMap<String, String>>>;

/// Kills `agent` and loads what it left in `state`: `None` for nothing
/// stored (only when `empty_ok`); any other outcome fails `what`.
fn kill_and_load(
    agent: &mut Child,
    state: &std::path::Path,
    what: &str,
    empty_ok: bool,
) -> Option<AgentState> {
    agent.kill().expect("SIGKILL");
    agent.wait().expect("reaped");
    let (store, moved_aside) = Store::open(state).expect("the store opens");
    assert!(moved_aside.is_none(), "{what}: the database was damaged");
    match store.load().expect("load") {
        Loaded::State(s) => Some(s),
        Loaded::Empty if empty_ok => None,
        other => panic!("{what}: expected a whole state, found {other:?}"),
    }
}

/// Asserts that `loaded` is exactly a snapshot the control plane published.
fn assert_published(published: &Published, loaded: &AgentState, what: &str) {
    let stored: BTreeMap<String, String> = loaded
        .resources
        .iter()
        .map(|(n, r)| (n.clone(), r.version.clone()))
        .collect();
    let published = published.lock().unwrap_or_else(|e| e.into_inner());
    let expected = published.get(&loaded.version).unwrap_or_else(|| {
        panic!(
            "{what}: stored version {} was never published",
            loaded.version
        )
    });
    assert_eq!(
        &stored, expected,
        "{what}: the stored resources are not exactly snapshot {}",
        loaded.version
    );
}

/// Kills of a new node during its first state.
const FIRST_ROUNDS: usize = 8;
