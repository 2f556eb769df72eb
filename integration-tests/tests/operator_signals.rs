//! What an operator alerts on, scraped from a running control plane's
//! `/metrics` as Prometheus would: a failing source, readiness, agents
//! behind the current snapshot and two agents under one node name.

use std::net::IpAddr;

use switchyard_control_plane::ControlPlane;
use switchyard_integration_tests::*;
use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The value of the one sample of `metric` whose labels include every
/// `labels` pair, from the control plane's `/metrics`.
async fn sample(cp: &ControlPlane, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = get_text(cp.admin_addr, "/metrics").await;
    assert_eq!(code, 200);
    let found: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let name_end = l.find(['{', ' ']).unwrap_or(l.len());
            &l[..name_end] == metric
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a sample without a value: {l}"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{metric}{labels:?}: {} samples in\n{body}",
        found.len()
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_source_shows_in_its_metrics_until_it_recovers() {
    init_logging();
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let typo = env.dir.path().join("manifsts");
    let good = format!("file:{}", env.manifests().display());
    let missing = format!("file:{}", typo.display());
    let cp = start_cp(env.cp_args_with_sources(&[good.clone(), missing.clone()])).await;
    cp_status_until(&cp, "the missing path reported", |s| {
        s.sources.len() == 2 && s.sources[1].last_error.is_some() && s.sources[0].synced
    })
    .await;

    for (metric, source, want) in [
        ("switchyard_control_plane_source_synced", &good, 1.0),
        ("switchyard_control_plane_source_failing", &good, 0.0),
        ("switchyard_control_plane_source_errors_total", &good, 0.0),
        ("switchyard_control_plane_source_synced", &missing, 0.0),
        ("switchyard_control_plane_source_failing", &missing, 1.0),
        (
            "switchyard_control_plane_source_errors_total",
            &missing,
            1.0,
        ),
    ] {
        assert_eq!(
            sample(&cp, metric, &[("source", source.as_str())]).await,
            want,
            "{metric} of {source}"
        );
    }
    let since = sample(
        &cp,
        "switchyard_control_plane_source_last_error_timestamp_seconds",
        &[("source", &missing)],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        since > now - 60.0 && since <= now + 1.0,
        "the error began {since}, now is {now}"
    );
    assert_eq!(
        sample(&cp, "switchyard_control_plane_ready", &[]).await,
        0.0
    );

    // The path appears: the source syncs, stops failing, and the error
    // count keeps its history.
    std::fs::create_dir(&typo).expect("mkdir");
    std::fs::write(
        typo.join("api.yaml"),
        service_yaml("shop", "api", 81, &["10.244.1.2"]),
    )
    .expect("write");
    cp_status_until(&cp, "ready", |s| s.ready).await;
    assert_eq!(
        sample(&cp, "switchyard_control_plane_ready", &[]).await,
        1.0
    );
    for (metric, want) in [
        ("switchyard_control_plane_source_synced", 1.0),
        ("switchyard_control_plane_source_failing", 0.0),
        ("switchyard_control_plane_source_errors_total", 1.0),
    ] {
        assert_eq!(
            sample(&cp, metric, &[("source", &missing)]).await,
            want,
            "{metric} once the path exists"
        );
    }
    cp.shutdown().await;
}

/// A hand-driven agent stream: it ACKs only when told to.
struct RawAgent {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::SnapshotUpdate>,
}

impl RawAgent {
    /// Opens a stream as `node` from the local address `from`.
    async fn connect(cp: &ControlPlane, node: &str, from: IpAddr) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc_addr))
            .expect("url")
            .local_address(Some(from))
            .connect()
            .await
            .expect("connect");
        let mut client = SnapshotDiscoveryClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        tx.send(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(v1::Hello {
                node_name: node.into(),
                ..Default::default()
            })),
        })
        .await
        .expect("queue the Hello");
        let inbound = within(
            "the stream to be answered",
            client.stream_snapshots(ReceiverStream::new(rx)),
        )
        .await
        .expect("the stream is accepted")
        .into_inner();
        Self { tx, inbound }
    }

    /// Reads one whole update; returns its nonce and version.
    async fn update(&mut self) -> (String, String) {
        loop {
            let part = within("an update", self.inbound.message())
                .await
                .expect("the stream stays open")
                .expect("an update");
            if !part.continued {
                return (part.nonce, part.snapshot_version);
            }
        }
    }

    async fn ack(&self, nonce: String, version: String) {
        self.tx
            .send(v1::AgentMessage {
                kind: Some(agent_message::Kind::Ack(v1::Ack {
                    nonce,
                    snapshot_version: version,
                })),
            })
            .await
            .expect("send the ACK");
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_held_at_an_older_version_counts_as_behind() {
    init_logging();
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let (agent, _) = start_recording_agent(agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("agent"),
    ))
    .await;
    let mut slow = RawAgent::connect(&cp, "node-slow", LOCAL).await;
    let (nonce, first) = slow.update().await;
    slow.ack(nonce, first.clone()).await;
    cp_status_until(&cp, "both agents at the first version", |s| {
        s.agents.len() == 2
            && s.agents
                .iter()
                .all(|a| a.acked_version.as_ref() == Some(&first))
    })
    .await;
    assert_eq!(
        sample(&cp, "switchyard_control_plane_agents_behind", &[]).await,
        0.0
    );
    assert_eq!(
        sample(&cp, "switchyard_control_plane_agents_behind_seconds", &[]).await,
        0.0
    );

    // A change: node-a follows, node-slow gets the update and sits on it.
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1", "10.244.1.2"]),
    );
    let doc = cp_status_until(&cp, "node-a at the second version", |s| {
        s.version.as_ref() != Some(&first)
            && s.agents
                .iter()
                .any(|a| a.node == "node-a" && a.acked_version == s.version)
    })
    .await;
    let second = doc.version.clone().expect("a version");
    let (nonce, version) = slow.update().await;
    assert_eq!(version, second);
    assert_eq!(
        sample(&cp, "switchyard_control_plane_agents_behind", &[]).await,
        1.0,
        "node-slow still runs {first}"
    );
    let behind = sample(&cp, "switchyard_control_plane_agents_behind_seconds", &[]).await;
    assert!(
        (0.0..60.0).contains(&behind),
        "behind since the second version: {behind} s"
    );
    let json = get_json(cp.admin_addr, "/status").await;
    let agents = json["agents"].as_array().expect("agents");
    let by_node = |n: &str| {
        agents
            .iter()
            .find(|a| a["node"] == n)
            .unwrap_or_else(|| panic!("{n} in {json}"))
    };
    assert!(by_node("node-slow")["behind_seconds"].is_u64(), "{json}");
    assert!(by_node("node-a").get("behind_seconds").is_none(), "{json}");

    // It ACKs: nobody is behind.
    slow.ack(nonce, version).await;
    cp_status_until(&cp, "node-slow at the second version", |s| {
        s.agents
            .iter()
            .all(|a| a.acked_version.as_ref() == Some(&second))
    })
    .await;
    assert_eq!(
        sample(&cp, "switchyard_control_plane_agents_behind", &[]).await,
        0.0
    );
    drop(slow);
    agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_node_name_are_shown_and_counted() {
    init_logging();
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let cp = start_cp(env.cp_args()).await;
    cp_status_until(&cp, "a first snapshot", |s| s.version.is_some()).await;
    let mut one = RawAgent::connect(&cp, "twin", LOCAL).await;
    one.update().await;
    assert_eq!(
        sample(&cp, "switchyard_control_plane_duplicate_node_names", &[]).await,
        0.0
    );
    // Another machine, as far as addresses go: all of 127/8 is loopback.
    let elsewhere: IpAddr = "127.0.0.2".parse().expect("address");
    let mut two = RawAgent::connect(&cp, "twin", elsewhere).await;
    two.update().await;
    let doc = cp_status_until(&cp, "the second stream", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "twin" && a.other_streams == 1)
    })
    .await;
    assert_eq!(doc.agents.len(), 1, "one entry per node name");
    assert_eq!(
        sample(&cp, "switchyard_control_plane_duplicate_node_names", &[]).await,
        1.0
    );
    let json = get_json(cp.admin_addr, "/status").await;
    assert_eq!(json["agents"][0]["other_streams"], 1, "{json}");

    // The older one goes: a single stream again.
    drop(one);
    cp_status_until(&cp, "the first stream to end", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "twin" && a.other_streams == 0)
    })
    .await;
    assert_eq!(
        sample(&cp, "switchyard_control_plane_duplicate_node_names", &[]).await,
        0.0
    );
    let json = get_json(cp.admin_addr, "/status").await;
    assert!(json["agents"][0].get("other_streams").is_none(), "{json}");
    assert_eq!(json["agents"][0]["connected"], true, "{json}");
    drop(two);
    cp.shutdown().await;
}
