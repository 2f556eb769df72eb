//! The DNS stub under abuse: one source opening thousands of TCP
//! connections does not stop the agent from ACKing, nor other clients
//! from resolving, and idle connections are closed; connections from
//! sources the access list does not allow are closed at accept (5,000 TCP
//! connections from one source; 400 from 20 sources not allowed).

use std::time::Duration;

use switchyard_agent::config::DnsListen;
use switchyard_integration_tests::dns::dig;
use switchyard_integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections the abusive "pod" opens.
const FLOOD: usize = 5000;

fn a_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in ["web", "shop", "svc", "cluster", "local"] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_flood_from_one_source_starves_no_one_else() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("a"),
    );
    args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
    args.dns_upstreams = vec!["127.0.0.1:9".parse().expect("addr")];
    let (agent, _) = start_recording_agent(args).await;
    let v1 = cp_status_until(&cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version");
    agent_at_version(&agent, &v1).await;
    let dns = agent.dns_addr.expect("DNS listening");

    // One "pod" (127.0.0.1) opens 5,000 connections and keeps them.
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        match tokio::net::TcpStream::connect(dns).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connecting: {e}"),
        }
    }
    // Those over the per-source limit were closed by the stub: a read on
    // them ends at once. At most --dns-max-tcp-per-source (16) stay open.
    let mut open = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(2), s.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert!(open <= 16, "{open} flood connections still open");
    let m = get_text(agent.admin_addr, "/metrics").await.1;
    assert!(
        m.lines()
            .any(|l| l.starts_with("switchyard_agent_dns_tcp_refused_total ")
                && l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    >= Some((FLOOD - 16) as f64)),
        "{m}"
    );

    // The agent still ACKs a change while the flood holds its connections.
    env.write(
        "api.yaml",
        &service_yaml("shop", "api", 81, &["10.244.1.11"]),
    );
    let v2 = cp_status_until(&cp, "the second snapshot", |s| {
        s.version.as_deref().is_some_and(|v| v != v1)
    })
    .await
    .version
    .expect("version");
    cp_status_until(&cp, "the ACK during the flood", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-a" && a.acked_version.as_deref() == Some(&v2))
    })
    .await;

    // Another client (127.0.0.2) resolves over TCP and UDP.
    let tcp = dig(
        dns,
        &["-b", "127.0.0.2", "+tcp", "api.shop.svc.cluster.local", "A"],
    )
    .await;
    assert_eq!(tcp.status, "NOERROR", "{}", tcp.raw);
    let udp = dig(dns, &["-b", "127.0.0.2", "web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(udp.status, "NOERROR", "{}", udp.raw);

    // A connection of the admitted ones still gets answers, in RFC 7766 framing.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.3:0".parse().expect("addr"))
        .expect("bind 127.0.0.3");
    let mut c = socket.connect(dns).await.expect("connect from 127.0.0.3");
    let q = a_query(7);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    c.write_all(&framed).await.expect("write");
    let mut len = [0u8; 2];
    within("a framed answer", c.read_exact(&mut len))
        .await
        .expect("length");
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    within("the answer", c.read_exact(&mut answer))
        .await
        .expect("answer");
    assert_eq!(&answer[..2], &7u16.to_be_bytes(), "our id");
    assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_sources_not_allowed_take_no_tcp_slot() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("a"),
    );
    args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
    args.dns_upstreams = vec!["127.0.0.1:9".parse().expect("addr")];
    // Only 127.0.0.1 may ask.
    args.dns_allow = vec!["127.0.0.1/32".parse().expect("cidr")];
    let (agent, _) = start_recording_agent(args).await;
    let v1 = cp_status_until(&cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version");
    agent_at_version(&agent, &v1).await;
    let dns = agent.dns_addr.expect("DNS listening");

    // 20 addresses that may not ask open 20 connections each (400, over
    // the 256 slots) and keep them.
    let mut flood = Vec::new();
    for host in 2..22u8 {
        for _ in 0..20 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
                .expect("bind a loopback address");
            flood.push(socket.connect(dns).await.expect("connect"));
        }
    }
    // Every one of them is closed at accept: a read ends at once (EOF).
    for s in &mut flood {
        let mut b = [0u8; 1];
        let n = within("a refused connection to be closed", s.read(&mut b)).await;
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    let m = get_text(agent.admin_addr, "/metrics").await.1;
    assert!(
        m.lines()
            .any(|l| l == "switchyard_agent_dns_tcp_refused_total 400"),
        "{m}"
    );
    // The allowed source still resolves over TCP.
    let tcp = dig(dns, &["+tcp", "web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(tcp.status, "NOERROR", "{}", tcp.raw);
    assert_eq!(tcp.answers.len(), 1, "{}", tcp.raw);
    drop(flood);
}
