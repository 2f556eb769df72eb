//! Hardening end to end: bounds on what agents may send, clusters and
//! identities that are refused with a reason, TLS failures that say what
//! is wrong on both sides, certificates rotated under running streams,
//! updates that fail for a local reason retried until they apply, and a
//! full disk said and recovered from. Covered: Hello bounds (fields,
//! counts, sizes, a flood of names), unknown clusters refused and shown,
//! transient NACKs retried to convergence, the ACK deadline, an update
//! never read (its stream ended, its slot freed), 64 streams that never
//! say Hello beside an agent, a second Hello, connection and stream bounds,
//! agent retention, and a full disk (a 16 MiB tmpfs filled under a running
//! agent, then freed).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_agent::dataplane::{ApplyError, Change, DataPlane};
use switchyard_control_plane::ControlPlane;
use switchyard_integration_tests::*;
use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn url(cp: &ControlPlane) -> String {
    format!("http://{}", cp.grpc_addr)
}

async fn current_version(cp: &ControlPlane) -> String {
    cp_status_until(cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version")
}

fn hello(
    node: &str,
    cluster: &str,
    versions: Vec<(String, String)>,
    continued: bool,
) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::Hello {
            node_name: node.into(),
            cluster_id: cluster.into(),
            initial_resource_versions: versions.into_iter().collect(),
            continued,
            ..Default::default()
        })),
    }
}

/// Opens a raw stream, sends `messages` and returns the call's outcome (the
/// first update, or the status it was refused with).
async fn raw_stream(
    cp: &ControlPlane,
    messages: Vec<v1::AgentMessage>,
) -> Result<
    (
        v1::SnapshotUpdate,
        mpsc::Sender<v1::AgentMessage>,
        tonic::Streaming<v1::SnapshotUpdate>,
    ),
    tonic::Status,
> {
    let mut client = SnapshotDiscoveryClient::connect(url(cp))
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let feeder = tx.clone();
    tokio::spawn(async move {
        for m in messages {
            if feeder.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut inbound = within(
        "the call's answer",
        client.stream_snapshots(ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();
    let first = within("a first update", inbound.message())
        .await?
        .expect("an update");
    Ok((first, tx, inbound))
}

fn web_env() -> TestEnv {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_fields_counts_and_sizes_are_bounded() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    current_version(&cp).await;

    let long_name = raw_stream(&cp, vec![hello(&"n".repeat(300), "", vec![], false)])
        .await
        .expect_err("a 300-byte node name");
    assert_eq!(long_name.code(), tonic::Code::InvalidArgument);
    assert!(
        long_name.message().contains("Hello.node_name is 300 bytes"),
        "{long_name:?}"
    );

    let long_zone = raw_stream(
        &cp,
        vec![v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(v1::Hello {
                node_name: "n".into(),
                zone: "z".repeat(100),
                ..Default::default()
            })),
        }],
    )
    .await
    .expect_err("a 100-byte zone");
    assert!(long_zone.message().contains("Hello.zone"), "{long_zone:?}");

    // Millions of unknown names, in parts: cut off at the bound (1,024 for a
    // one-Service view) without reading the rest.
    let parts: Vec<v1::AgentMessage> = (0..2_000)
        .map(|p| {
            let versions = (0..500)
                .map(|i| {
                    (
                        format!("default/x/svc-{p}-{i}"),
                        "0123456789abcdef".to_owned(),
                    )
                })
                .collect();
            hello("flood", "", versions, true)
        })
        .collect();
    let flood = raw_stream(&cp, parts).await.expect_err("too many names");
    assert_eq!(flood.code(), tonic::Code::ResourceExhausted);
    assert!(
        flood.message().contains("Hello.initial_resource_versions")
            && flood.message().contains("1024"),
        "{flood:?}"
    );

    // One message over the 1 MiB bound.
    let big: Vec<(String, String)> = (0..20_000)
        .map(|i| {
            (
                format!("default/x/a-rather-long-service-name-{i:08}"),
                "0123456789abcdef".into(),
            )
        })
        .collect();
    let too_big = raw_stream(&cp, vec![hello("big", "", big, false)])
        .await
        .expect_err("a 1.4 MB message");
    assert_eq!(too_big.code(), tonic::Code::ResourceExhausted);
    assert!(
        too_big.message().contains("larger than 1048576 bytes"),
        "{too_big:?}"
    );

    // Nothing of them is kept: no agent is listed.
    assert!(cp.status.document().agents.is_empty());
    let metrics = cp.metrics.encode();
    assert!(
        metrics.contains("streams_refused_total{reason=\"hello\"} 4"),
        "{metrics}"
    );

    // A Hello in parts within the bounds is served.
    let (first, _tx, _inbound) = raw_stream(
        &cp,
        vec![
            hello(
                "parts",
                "",
                vec![("default/shop/web".into(), "stale".into())],
                true,
            ),
            hello(
                "parts",
                "",
                vec![("default/shop/gone".into(), "x".into())],
                false,
            ),
        ],
    )
    .await
    .expect("served");
    assert_eq!(first.resources.len(), 1, "web at its current version");
    assert_eq!(first.removed_resources, ["default/shop/gone"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_a_cluster_not_served_is_refused_and_shown() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;

    let mut args = agent_args("node-x", &url(&cp), &env.state("x"));
    args.cluster = "prod-eu".into();
    let (agent, rec) = start_recording_agent(args).await;
    let err = agent_status_until(&agent, "the refusal", |s| s.last_error.is_some())
        .await
        .last_error
        .expect("error");
    assert!(
        err.contains("NotFound") && err.contains("cluster \"prod-eu\" is not served"),
        "{err}"
    );
    assert!(err.contains("it serves: default"), "{err}");
    let doc = cp_status_until(&cp, "the refused agent in /status", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-x" && a.refused.is_some())
    })
    .await;
    let shown = doc
        .agents
        .iter()
        .find(|a| a.node == "node-x")
        .expect("listed");
    assert!(!shown.connected);
    assert_eq!(shown.cluster, "prod-eu");
    assert!(
        rec.lock().expect("lock").versions.is_empty(),
        "no empty view applied"
    );

    // The same agent in the served cluster is served.
    let (good, _) = start_recording_agent(agent_args("node-y", &url(&cp), &env.state("y"))).await;
    agent_at_version(&good, &v1).await;
}

/// A data plane that fails its first `failures` calls as a held xtables
/// lock would, then applies.
#[derive(Debug, Clone)]
struct FlakyDataPlane {
    failures: Arc<Mutex<usize>>,
}

impl DataPlane for FlakyDataPlane {
    fn name(&self) -> &'static str {
        "flaky"
    }

    fn apply(&mut self, _change: &Change<'_>) -> Result<(), ApplyError> {
        let mut left = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if *left > 0 {
            *left -= 1;
            return Err(ApplyError::Command(
                "iptables-restore: Another app is currently holding the xtables lock".into(),
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_until_it_applies_without_a_cluster_change() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    let flaky = FlakyDataPlane {
        failures: Arc::new(Mutex::new(2)),
    };
    let agent = start_agent(
        agent_args("node-a", &url(&cp), &env.state("a")),
        Box::new(flaky.clone()),
    )
    .await;
    // The NACK is visible while it lasts...
    let nacked = cp_status_until(&cp, "the NACK", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-a" && a.nacked_version.as_deref() == Some(&v1))
    })
    .await;
    let shown = nacked
        .agents
        .iter()
        .find(|a| a.node == "node-a")
        .expect("listed");
    assert!(
        shown
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("xtables lock")),
        "{shown:?}"
    );
    // ...and the agent converges on the same snapshot, with no new change.
    agent_at_version(&agent, &v1).await;
    let acked = cp_status_until(&cp, "the ACK after the retries", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-a" && a.connected && a.acked_version.as_deref() == Some(&v1))
    })
    .await;
    assert_eq!(
        acked.version.as_deref(),
        Some(v1.as_str()),
        "no new snapshot was needed"
    );
    assert_eq!(*flaky.failures.lock().expect("lock"), 0);
    let m = cp.metrics.encode();
    assert!(
        m.contains("switchyard_control_plane_nacks_total 1"),
        "one NACK, no resend loop: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_said_and_the_store_recovers_once_space_comes_back() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    let disk = Tmpfs::mount(16 << 20);
    let state_dir = disk.dir.path().join("agent");
    let agent = start_agent(
        agent_args("node-a", &url(&cp), &state_dir),
        Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
    )
    .await;
    agent_at_version(&agent, &v1).await;
    let (code, _) = get_text(agent.admin_addr, "/healthz").await;
    assert_eq!(code, 200);

    // The disk fills up; the next change (some pages of sled's log)
    // cannot be persisted.
    disk.fill("filler");
    let addresses: Vec<String> = (0..1000)
        .map(|i| format!("10.244.{}.{}", 2 + i / 250, 1 + i % 250))
        .collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    env.write("more.yaml", &service_yaml("shop", "more", 81, &addresses));
    let failing = agent_status_until(&agent, "the persist failure", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("persisting the state"))
    })
    .await;
    assert_eq!(failing.version.as_deref(), Some(v1.as_str()), "v1 stays");
    let report = agent.status.sync_report(Duration::from_secs(60));
    assert!(!report.healthy, "{report:?}");
    let (code, body) = get_text(agent.admin_addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot be persisted"), "{body}");
    let status = get_json(agent.admin_addr, "/status").await;
    assert!(
        status["sync"]["persist_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{status}"
    );

    // Space comes back: a retry applies the change, persisted, and health
    // comes back with it (sled kept its I/O error for good before).
    std::fs::remove_file(disk.dir.path().join("filler")).expect("free the disk");
    let v2 = cp_status_until(&cp, "the second snapshot", |s| {
        s.version.as_deref().is_some_and(|v| v != v1)
    })
    .await
    .version
    .expect("v2");
    agent_at_version(&agent, &v2).await;
    agent_status_until(&agent, "health back", |s| s.last_error.is_none()).await;
    let (code, body) = get_text(agent.admin_addr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    agent.shutdown().await;

    // What was written after the failure is the whole state, readable.
    let (store, discarded) = switchyard_agent::store::Store::open(&state_dir).expect("open");
    assert_eq!(discarded, None);
    match store.load().expect("load") {
        switchyard_agent::store::Loaded::State(s) => {
            assert_eq!(s.version, v2);
            assert_eq!(s.resources.len(), 2);
        }
        other => panic!("the state after recovery: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_never_answered_ends_the_stream_after_the_deadline() {
    let env = web_env();
    let mut args = env.cp_args();
    args.ack_timeout = Duration::from_millis(300);
    let cp = start_cp(args).await;
    current_version(&cp).await;
    let (_first, _tx, mut inbound) = raw_stream(&cp, vec![hello("silent", "", vec![], false)])
        .await
        .expect("served");
    // No ACK: the control plane ends the stream with a reason.
    let end = within("the deadline", inbound.message())
        .await
        .expect_err("ended");
    assert_eq!(end.code(), tonic::Code::DeadlineExceeded);
    assert!(end.message().contains("--ack-timeout"), "{end:?}");
    cp_status_until(&cp, "the agent shown disconnected", |s| {
        s.agents.iter().any(|a| a.node == "silent" && !a.connected)
    })
    .await;
}

/// Manifests of `n` Services, so that a full state is tens of KiB.
fn many_services_env(n: usize) -> TestEnv {
    let env = TestEnv::new();
    let body: Vec<String> = (0..n)
        .map(|i| {
            service_yaml(
                "shop",
                &format!("web-{i}"),
                80,
                &["10.244.1.10", "10.244.1.11"],
            )
        })
        .collect();
    env.write("many.yaml", &body.join("---\n"));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_is_not_read_ends_its_stream_and_frees_its_slot() {
    let env = many_services_env(2000);
    let mut args = env.cp_args();
    args.ack_timeout = Duration::from_millis(500);
    args.max_agent_streams = 1;
    let cp = start_cp(args).await;
    let v1 = current_version(&cp).await;
    let from: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let _unread = hostile::unread_streams(&url(&cp), from, 1, "unread").await;
    // Its sends stall on flow control: the deadline counts from the first
    // part, so the stream ends and its connection is closed.
    cp_status_until(&cp, "the unread stream to end", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "unread-0" && !a.connected)
    })
    .await;
    assert!(
        cp.metrics
            .encode()
            .contains(r#"switchyard_control_plane_streams_refused_total{reason="undrained"} 1"#),
        "{}",
        cp.metrics.encode()
    );
    // Its slot (--max-agent-streams 1) is free for an agent that reads.
    let agent = start_agent(
        agent_args("node-a", &url(&cp), &env.state("a")),
        Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
    )
    .await;
    agent_at_version(&agent, &v1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_say_hello_do_not_hold_off_an_agent() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    // 64 streams that never send a Hello, from another address: four may
    // wait for a turn (each then has 1 s to start its Hello), the rest are
    // refused at once. Before, all 64 queued for the 8 turns, 10 s each.
    let from: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let mut idle = hostile::idle_streams(&url(&cp), from, 64).await;
    for _ in 0..60 {
        let refused = within(
            "the idle streams beyond the bound to be refused",
            idle.ended.recv(),
        )
        .await
        .expect("idle stream tasks alive");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains("--max-hellos-waiting-per-address"),
            "{refused:?}"
        );
    }
    // An agent from its own address waits for none of them (within the
    // harness's 20 s: before, it waited behind 64 x 10 s / 8).
    let agent = start_agent(
        agent_args("node-a", &url(&cp), &env.state("a")),
        Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
    )
    .await;
    agent_at_version(&agent, &v1).await;
    // The four admitted had 1 s each from their turn to start a Hello.
    for _ in 0..4 {
        let ended = within("the admitted idle streams to be ended", idle.ended.recv())
            .await
            .expect("idle stream tasks alive");
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    }
    assert_eq!(prometheus_parse_refused(&cp.metrics.encode(), "hello"), 4.0);
}

/// `switchyard_control_plane_streams_refused_total{reason}` in a text exposition.
fn prometheus_parse_refused(text: &str, reason: &str) -> f64 {
    let key = format!(r#"switchyard_control_plane_streams_refused_total{{reason="{reason}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_ends_the_stream() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    current_version(&cp).await;
    let (_first, tx, mut inbound) = raw_stream(&cp, vec![hello("twice", "", vec![], false)])
        .await
        .expect("served");
    tx.send(hello("twice", "", vec![], false))
        .await
        .expect("the stream takes it");
    let end = within("the stream's end", inbound.message())
        .await
        .expect_err("ended");
    assert_eq!(end.code(), tonic::Code::InvalidArgument, "{end:?}");
    assert!(end.message().contains("a second Hello"), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_streams_are_bounded() {
    let env = web_env();
    let mut args = env.cp_args();
    args.max_connections_per_address = 2;
    args.max_agent_streams = 1;
    let cp = start_cp(args).await;
    let v1 = current_version(&cp).await;

    // One agent stream is served; a second is refused with a reason.
    let (a, _) = start_recording_agent(agent_args("node-a", &url(&cp), &env.state("a"))).await;
    agent_at_version(&a, &v1).await;
    let (b, _) = start_recording_agent(agent_args("node-b", &url(&cp), &env.state("b"))).await;
    let err = agent_status_until(&b, "the refusal", |s| s.last_error.is_some())
        .await
        .last_error
        .expect("error");
    assert!(
        err.contains("ResourceExhausted") && err.contains("--max-agent-streams"),
        "{err}"
    );
    b.shutdown().await;
    // b's connection is released when the control plane sees it close.
    within("agent b's connection to close", async {
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        while cp.metrics.connections_open.get() != 1 {
            poll.tick().await;
        }
    })
    .await;

    // Two connections from 127.0.0.1 are open (agent a, and nothing else
    // once b has gone); a third one from the same address is closed at once.
    use tokio::io::AsyncReadExt;
    let _second = tokio::net::TcpStream::connect(cp.grpc_addr)
        .await
        .expect("connect");
    let mut third = tokio::net::TcpStream::connect(cp.grpc_addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = within("the third connection to be closed", async {
        loop {
            match third.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) if n > 0 => {}
                Ok(_) => return 0,
            }
        }
    })
    .await;
    assert_eq!(n, 0);
    let m = cp.metrics.encode();
    // Exported at 0 from the start: counted, not merely present.
    assert!(
        m.contains("connections_refused_total{reason=\"per_address\"} ")
            && !m.contains("connections_refused_total{reason=\"per_address\"} 0\n"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_is_trimmed_once_a_burst_of_streams_is_over() {
    let env = web_env();
    let cp = start_cp(env.cp_args()).await;
    current_version(&cp).await;
    // No stream, no trim: a control plane that only builds never trims.
    assert_eq!(cp.metrics.heap_trims.get(), 0);
    // Two agents connect with Hellos, sync and leave: one burst.
    for node in ["node-a", "node-b"] {
        let versions = vec![("default/shop/web".to_owned(), "stale".to_owned())];
        let (_first, _tx, _inbound) = raw_stream(&cp, vec![hello(node, "", versions, false)])
            .await
            .expect("served");
    }
    cp_status_until(&cp, "both agents shown disconnected", |s| {
        s.agents.iter().filter(|a| !a.connected).count() == 2
    })
    .await;
    within("a heap trim after the burst", async {
        let mut metrics = tokio::time::interval(Duration::from_millis(50));
        while cp.metrics.heap_trims.get() == 0 {
            metrics.tick().await;
        }
    })
    .await;
    // Four stream events (two connects, two ends) within a quiet second of
    // each other: trimmed per burst, not per event.
    let trims = cp.metrics.heap_trims.get();
    assert!(
        trims < 4,
        "{trims} trims for one burst of four stream events"
    );
    let m = cp.metrics.encode();
    assert!(
        m.contains(&format!(
            "switchyard_control_plane_heap_trim_seconds_count {trims}"
        )),
        "each trim is timed: {m}"
    );
}

#[test]
fn status_forgets_agents_that_left_long_ago() {
    use switchyard_control_plane::status::{AgentRetention, Status};
    let status = Status::with_retention(AgentRetention {
        forget_after: Duration::from_secs(3600),
        max_disconnected: 2,
    });
    let handles: Vec<_> = (0..5)
        .map(|i| status.connected(&format!("node-{i}"), "default", ""))
        .collect();
    assert_eq!(status.document().agents.len(), 5);
    for h in &handles[..4] {
        status.disconnected(h);
    }
    let doc = status.document();
    assert_eq!(
        doc.agents.len(),
        3,
        "one connected and two of the four gone"
    );
    assert!(doc.agents.iter().any(|a| a.node == "node-4" && a.connected));
    let forgetful = Status::with_retention(AgentRetention {
        forget_after: Duration::ZERO,
        max_disconnected: 10,
    });
    let h = forgetful.connected("node-a", "default", "");
    forgetful.disconnected(&h);
    assert!(forgetful.document().agents.is_empty());
}
