//! The DNS stub end to end: a control plane reading real YAML, an agent
//! serving DNS on a real socket, `dig` as the client, a fake upstream.
//! Covered: records, pod names, negatives, forwarding to the fake
//! upstream, resolve-after-ACK, truncation and TCP, refused sources,
//! malformed packets, and the link-local default inside a network
//! namespace the test creates: NOTRACK rules once across two starts, a
//! resolv.conf naming only the stub reported and answered SERVFAIL at once,
//! `cleanup` removing rules and address.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;

use switchyard_agent::Agent;
use switchyard_agent::config::DnsListen;
use switchyard_integration_tests::dns::{FakeUpstream, dig};
use switchyard_integration_tests::*;

type Env = TestEnv;

const HEADLESS: &str = "apiVersion: v1
kind: Service
metadata: {namespace: shop, name: db}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: db-1
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  hostname: db-0
  conditions: {ready: true}
- addresses: [10.244.1.6]
  conditions: {ready: true}
- addresses: [10.244.1.7]
  hostname: db-2
  conditions: {ready: false}
";

const EXTERNAL: &str = "apiVersion: v1
kind: Service
metadata: {namespace: shop, name: pay}
spec:
  type: ExternalName
  externalName: pay.example.com
";

/// A headless service with `n` ready endpoints (for answers over 512 bytes).
fn big_headless(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop, name: big}\nspec:\n  clusterIP: None\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: shop\n  name: big-1\n  labels: {kubernetes.io/service-name: big}\naddressType: IPv4\nports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "- addresses: [10.244.9.{i}]\n  conditions: {{ready: true}}\n"
        ));
    }
    y
}

struct Cluster {
    env: Env,
    cp: switchyard_control_plane::ControlPlane,
    agent: Agent,
    dns: SocketAddr,
    upstream: FakeUpstream,
}

/// A control plane with the shop manifests and one agent serving DNS on
/// `127.0.0.1:0`, forwarding to a fake upstream; `tweak` adjusts the agent.
async fn cluster(tweak: impl FnOnce(&mut switchyard_agent::Args)) -> Cluster {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env.write("db.yaml", HEADLESS);
    env.write("pay.yaml", EXTERNAL);
    env.write("big.yaml", &big_headless(40));
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), None)).await;
    let upstream = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 7)).await;
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("node-a"),
    );
    args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
    args.dns_upstreams = vec![upstream.addr];
    tweak(&mut args);
    let (agent, _) = start_recording_agent(args).await;
    let version = cp_status_until(&cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version");
    agent_at_version(&agent, &version).await;
    let dns = agent.dns_addr.expect("DNS listening");
    Cluster {
        env,
        cp,
        agent,
        dns,
        upstream,
    }
}

fn cluster_ip(c: &Cluster, name: &str) -> String {
    let state = c.agent.state.borrow().clone();
    state.resources[&format!("default/shop/{name}")]
        .state
        .service
        .cluster_ips[0]
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_type_and_negative_answer_with_dig() {
    let c = cluster(|_| {}).await;
    let web_ip = cluster_ip(&c, "web");

    let a = dig(c.dns, &["web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert!(a.has_flag("aa"));
    assert_eq!(a.data(), [web_ip.as_str()]);
    assert_eq!(
        a.answers[0].split_whitespace().nth(1),
        Some("5"),
        "TTL: {}",
        a.raw
    );

    // Case-insensitive, and the case asked is kept.
    let mixed = dig(c.dns, &["WEB.Shop.svc.CLUSTER.local", "A"]).await;
    assert_eq!(mixed.data(), [web_ip.as_str()]);
    assert!(mixed.answers[0].starts_with("WEB.Shop.svc.CLUSTER.local."));

    let srv = dig(c.dns, &["_http._tcp.web.shop.svc.cluster.local", "SRV"]).await;
    assert_eq!(srv.data(), ["0 100 80 web.shop.svc.cluster.local."]);
    assert_eq!(srv.additional.len(), 1, "the target's address: {}", srv.raw);

    let rev = dig(c.dns, &["-x", &web_ip]).await;
    assert_eq!(rev.data(), ["web.shop.svc.cluster.local."]);

    // Headless: ready endpoints only, per-endpoint names, SRV per endpoint.
    let db = dig(c.dns, &["db.shop.svc.cluster.local", "A"]).await;
    assert_eq!(db.data(), ["10.244.1.5", "10.244.1.6"]);
    let host = dig(c.dns, &["db-0.db.shop.svc.cluster.local", "A"]).await;
    assert_eq!(host.data(), ["10.244.1.5"]);
    let dashed = dig(c.dns, &["10-244-1-6.db.shop.svc.cluster.local", "A"]).await;
    assert_eq!(dashed.data(), ["10.244.1.6"]);
    let db_srv = dig(c.dns, &["_pg._tcp.db.shop.svc.cluster.local", "SRV"]).await;
    assert_eq!(
        db_srv.data(),
        [
            "0 100 5432 10-244-1-6.db.shop.svc.cluster.local.",
            "0 100 5432 db-0.db.shop.svc.cluster.local."
        ]
    );
    let ep_rev = dig(c.dns, &["-x", "10.244.1.5"]).await;
    assert_eq!(ep_rev.data(), ["db-0.db.shop.svc.cluster.local."]);
    let not_ready = dig(c.dns, &["db-2.db.shop.svc.cluster.local", "A"]).await;
    assert_eq!(not_ready.status, "NXDOMAIN");

    // ExternalName: the CNAME, followed through the upstream.
    let pay = dig(c.dns, &["pay.shop.svc.cluster.local", "A"]).await;
    assert_eq!(pay.status, "NOERROR", "{}", pay.raw);
    assert_eq!(pay.types(), ["CNAME", "A"]);
    assert_eq!(pay.data(), ["192.0.2.7", "pay.example.com."]);

    let txt = dig(c.dns, &["dns-version.cluster.local", "TXT"]).await;
    assert_eq!(txt.data(), ["\"1.1.0\""]);

    // NODATA vs NXDOMAIN, both with the SOA.
    for (name, qtype, status) in [
        ("web.shop.svc.cluster.local", "AAAA", "NOERROR"),
        ("shop.svc.cluster.local", "A", "NOERROR"),
        ("svc.cluster.local", "A", "NOERROR"),
        ("_tcp.web.shop.svc.cluster.local", "SRV", "NOERROR"),
        ("nope.shop.svc.cluster.local", "A", "NXDOMAIN"),
        ("web.nope.svc.cluster.local", "A", "NXDOMAIN"),
    ] {
        let d = dig(c.dns, &[name, qtype]).await;
        assert_eq!(d.status, status, "{name} {qtype}: {}", d.raw);
        assert!(d.answers.is_empty(), "{name} {qtype}: {}", d.raw);
        assert_eq!(d.authority.len(), 1, "{name} {qtype}: {}", d.raw);
        assert!(d.authority[0].contains("SOA"), "{}", d.raw);
    }

    // EDNS: dig sends OPT by default and we answer with one.
    assert!(a.raw.contains("OPT PSEUDOSECTION"), "{}", a.raw);
    assert!(a.raw.contains("udp: 1232"), "{}", a.raw);

    // Figures on /status and /metrics.
    let status = get_json(c.agent.admin_addr, "/status").await;
    assert!(
        status["dns"]["names"].as_u64().expect("names") > 10,
        "{status}"
    );
    assert!(status["dns"]["queries"]["NOERROR"].as_u64().expect("count") > 10);
    assert!(
        status["dns"]["queries"]["NXDOMAIN"]
            .as_u64()
            .expect("count")
            >= 3
    );
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_responses_total{rcode=\"NXDOMAIN\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_agent_dns_index_build_seconds"),
        "{metrics}"
    );
}

/// Pod names as CoreDNS's default `pods insecure` mode answers them, and
/// headless endpoints without a hostname under their dashed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_names_and_dashed_headless_names_with_dig() {
    let c = cluster(|_| {}).await;
    let before = c.upstream.queries.load(Ordering::Relaxed);
    let pod = dig(c.dns, &["10-250-1-2.default.pod.cluster.local", "A"]).await;
    assert_eq!(pod.status, "NOERROR", "{}", pod.raw);
    assert!(pod.has_flag("aa"), "{}", pod.raw);
    assert_eq!(pod.data(), ["10.250.1.2"]);
    let v6 = dig(c.dns, &["fd00-244-1--5.shop.pod.cluster.local", "AAAA"]).await;
    assert_eq!(v6.data(), ["fd00:244:1::5"], "{}", v6.raw);
    let other_type = dig(c.dns, &["10-250-1-2.default.pod.cluster.local", "AAAA"]).await;
    assert_eq!(other_type.status, "NOERROR", "{}", other_type.raw);
    assert!(other_type.answers.is_empty() && other_type.authority.len() == 1);
    let junk = dig(c.dns, &["web.default.pod.cluster.local", "A"]).await;
    assert_eq!(junk.status, "NXDOMAIN", "{}", junk.raw);
    let dashed = dig(c.dns, &["10-244-1-6.db.shop.svc.cluster.local", "A"]).await;
    assert_eq!(dashed.data(), ["10.244.1.6"], "{}", dashed.raw);
    assert_eq!(
        c.upstream.queries.load(Ordering::Relaxed),
        before,
        "answered from the zone, not forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_to_the_upstream() {
    let c = cluster(|_| {}).await;
    let before = c.upstream.queries.load(Ordering::Relaxed);
    let d = dig(c.dns, &["www.example.org", "A"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.data(), ["192.0.2.7"]);
    assert!(d.has_flag("ra") && !d.has_flag("aa"));
    let tcp = dig(c.dns, &["+tcp", "api.example.org", "A"]).await;
    assert_eq!(tcp.data(), ["192.0.2.7"]);
    assert_eq!(c.upstream.queries.load(Ordering::Relaxed) - before, 2);
    // Reverse names we do not know fall through to the upstream too.
    let rev = dig(c.dns, &["-x", "192.0.2.99"]).await;
    assert_eq!(rev.status, "NOERROR", "{}", rev.raw);
    // Asked again: answered from the cache, the TTL counting down from 60.
    let again = dig(c.dns, &["WWW.example.org", "A"]).await;
    assert_eq!(again.data(), ["192.0.2.7"]);
    let ttl: u32 = again.answers[0]
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .expect("ttl");
    assert!(
        ttl <= 30,
        "positive answers are kept 30 s at most: {}",
        again.raw
    );
    assert_eq!(c.upstream.queries.load(Ordering::Relaxed) - before, 3);
    let status = get_json(c.agent.admin_addr, "/status").await;
    assert_eq!(status["dns"]["forwarded"], 3, "{status}");
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_cache_hits_total 1"),
        "{metrics}"
    );
    // Timed: the three waits for the upstream, and the two UDP queries
    // from receipt to answer (the TCP one and the cache hit are not).
    assert!(
        metrics.contains("switchyard_agent_dns_upstream_seconds_count 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_agent_dns_forward_seconds_count 2"),
        "{metrics}"
    );
}

/// `--dns-forward`: names in a stub domain go to its server, whatever
/// their case, and others to the default upstream. `--dns-serve-stale`:
/// once the default upstream is gone, an answer that expired (TTL 1 s,
/// waited out: the behaviour under test) is handed out with TTL 30 s, and
/// a name never seen is still SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_domains_go_to_their_servers_and_stale_answers_cover_a_dead_upstream() {
    let corp = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 99)).await;
    let short = FakeUpstream::start_with_ttl(Ipv4Addr::new(192, 0, 2, 8), 1).await;
    let (corp_addr, short_addr) = (corp.addr, short.addr);
    let c = cluster(|a| {
        a.dns_forward = vec![("corp.example".into(), vec![corp_addr])];
        a.dns_upstreams = vec![short_addr];
        a.dns_serve_stale = std::time::Duration::from_secs(3600);
    })
    .await;
    for name in ["host.corp.example", "a.B.Corp.Example"] {
        let d = dig(c.dns, &[name, "A"]).await;
        assert_eq!(d.data(), ["192.0.2.99"], "{name}: {}", d.raw);
    }
    let d = dig(c.dns, &["www.example.org", "A"]).await;
    assert_eq!(d.data(), ["192.0.2.8"], "{}", d.raw);
    assert_eq!(corp.queries.load(Ordering::Relaxed), 2);
    assert_eq!(short.queries.load(Ordering::Relaxed), 1);
    let status = get_json(c.agent.admin_addr, "/status").await;
    assert_eq!(
        status["dns"]["forward_zones"]["corp.example."],
        serde_json::json!([corp_addr.to_string()]),
        "{status}"
    );

    short.stop();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let stale = dig(c.dns, &["www.example.org", "A"]).await;
    assert_eq!(stale.status, "NOERROR", "{}", stale.raw);
    assert_eq!(stale.data(), ["192.0.2.8"]);
    assert!(
        stale.answers[0].split_whitespace().nth(1) == Some("30"),
        "a stale answer's TTL: {}",
        stale.raw
    );
    let never = dig(c.dns, &["other.example.org", "A"]).await;
    assert_eq!(never.status, "SERVFAIL", "{}", never.raw);
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_stale_answers_total 1"),
        "{metrics}"
    );
}

/// Prefetch: a name asked for again in the last second of its 2 s life is
/// fetched again in the background, so once its first answer would have
/// expired it is still answered from the cache (the waits are the TTL
/// under test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_asked_again_near_its_expiry_is_fetched_again_ahead() {
    let up = FakeUpstream::start_with_ttl(Ipv4Addr::new(192, 0, 2, 9), 2).await;
    let up_addr = up.addr;
    let c = cluster(|a| a.dns_upstreams = vec![up_addr]).await;
    let asked = || up.queries.load(Ordering::Relaxed);
    let first = std::time::Instant::now();
    assert_eq!(
        dig(c.dns, &["www.example.org", "A"]).await.data(),
        ["192.0.2.9"]
    );
    assert_eq!(asked(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        dig(c.dns, &["www.example.org", "A"]).await.data(),
        ["192.0.2.9"]
    );
    within("the prefetch", async {
        while asked() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_prefetches_total 1"),
        "{metrics}"
    );
    // Past the first answer's expiry: still from the cache, no client
    // query waits for the upstream (it may prefetch again, the new
    // answer being in its last second too).
    let past = std::time::Duration::from_millis(2300).saturating_sub(first.elapsed());
    tokio::time::sleep(past).await;
    assert_eq!(
        dig(c.dns, &["www.example.org", "A"]).await.data(),
        ["192.0.2.9"]
    );
    let status = get_json(c.agent.admin_addr, "/status").await;
    assert_eq!(
        status["dns"]["forwarded"], 1,
        "only the first query went upstream: {status}"
    );
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_cache_hits_total 2"),
        "{metrics}"
    );
}

/// DNS programming latency, as CoreDNS's: a slice changed after the agent
/// started, stamped with the time of its change, is timed from then to
/// the index that answers from it (the slices the agent started with are
/// not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_slice_is_timed_until_the_stub_answers_from_it() {
    let c = cluster(|_| {}).await;
    let count = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("switchyard_agent_dns_programming_duration_seconds_count")
                    && l.contains("service_kind=\"cluster_ip\"")
            })
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = count(&get_text(c.agent.admin_addr, "/metrics").await.1);
    assert_eq!(before, 0, "nothing the agent started with is timed");
    let stamped = jiff::Timestamp::now().to_string();
    let late = service_yaml("shop", "late", 80, &["10.244.1.30"]).replace(
        "  name: late-1\n",
        &format!(
            "  name: late-1\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{stamped}\"\n"
        ),
    );
    c.env.write("late.yaml", &late);
    agent_status_until(&c.agent, "the new Service in DNS", |s| {
        s.dns.as_ref().is_some_and(|d| d.names > 0) && s.resources == 5
    })
    .await;
    let web = dig(c.dns, &["late.shop.svc.cluster.local", "A"]).await;
    assert_eq!(web.status, "NOERROR", "{}", web.raw);
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert_eq!(count(&metrics), 1, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_gives_servfail() {
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent = dead.local_addr().expect("addr");
    let c = cluster(|a| a.dns_upstreams = vec![silent]).await;
    let d = dig(c.dns, &["www.example.org", "A"]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    // The cluster zone does not depend on the upstream.
    let web = dig(c.dns, &["web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(web.status, "NOERROR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_resolves_once_acked_and_stops_once_deleted() {
    let c = cluster(|_| {}).await;
    let name = "fresh.shop.svc.cluster.local";
    assert_eq!(dig(c.dns, &[name, "A"]).await.status, "NXDOMAIN");
    let old = c.cp.status.document().version.expect("version");
    c.env.write(
        "fresh.yaml",
        &service_yaml("shop", "fresh", 80, &["10.244.3.3"]),
    );
    let v = cp_status_until(&c.cp, "a snapshot with fresh", |s| {
        s.version.as_deref().is_some_and(|v| v != old)
    })
    .await
    .version
    .expect("version");
    cp_status_until(&c.cp, "node-a to ACK it", |s| {
        s.agents
            .iter()
            .any(|a| a.acked_version.as_deref() == Some(v.as_str()))
    })
    .await;
    // No waiting beyond the ACK: the answer is there.
    let d = dig(c.dns, &[name, "A"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.data(), [cluster_ip(&c, "fresh")]);

    c.env.remove("fresh.yaml");
    let v2 = cp_status_until(&c.cp, "a snapshot without fresh", |s| {
        s.version.as_deref().is_some_and(|x| x != v)
    })
    .await
    .version
    .expect("version");
    cp_status_until(&c.cp, "node-a to ACK the deletion", |s| {
        s.agents
            .iter()
            .any(|a| a.acked_version.as_deref() == Some(v2.as_str()))
    })
    .await;
    assert_eq!(dig(c.dns, &[name, "A"]).await.status, "NXDOMAIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let c = cluster(|_| {}).await;
    let name = "big.shop.svc.cluster.local";
    // Without EDNS the limit is 512 bytes: TC, with the records that fit
    // (hickory-server's truncation; RFC 2181 §9 allows that or none).
    let trunc = dig(c.dns, &["+noedns", "+ignore", name, "A"]).await;
    assert!(trunc.has_flag("tc"), "{}", trunc.raw);
    assert!(trunc.answers.len() < 40, "{}", trunc.raw);
    // dig retries over TCP by itself on TC.
    let retried = dig(c.dns, &["+noedns", name, "A"]).await;
    assert_eq!(retried.answers.len(), 40, "{}", retried.raw);
    let tcp = dig(
        c.dns,
        &["+tcp", "_http._tcp.big.shop.svc.cluster.local", "SRV"],
    )
    .await;
    assert_eq!(tcp.answers.len(), 40);
    assert_eq!(tcp.additional.len(), 40);
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_truncated_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_the_allowed_ranges_are_refused() {
    let c = cluster(|a| a.dns_allow = vec!["10.0.0.0/8".parse().expect("net")]).await;
    let before = c.upstream.queries.load(Ordering::Relaxed);
    for name in ["web.shop.svc.cluster.local", "www.example.org"] {
        let d = dig(c.dns, &[name, "A"]).await;
        assert_eq!(d.status, "REFUSED", "{}", d.raw);
        assert!(d.answers.is_empty());
    }
    assert_eq!(
        c.upstream.queries.load(Ordering::Relaxed),
        before,
        "nothing forwarded"
    );
    let status = get_json(c.agent.admin_addr, "/status").await;
    assert_eq!(status["dns"]["refused_sources"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_before_the_first_snapshot() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 1: the agent never gets a snapshot.
    let mut args = agent_args("node-a", "http://127.0.0.1:1", &dir.path().join("a"));
    args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
    let (agent, _) = start_recording_agent(args).await;
    let d = dig(
        agent.dns_addr.expect("dns"),
        &["web.shop.svc.cluster.local", "A"],
    )
    .await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_or_nothing_and_the_stub_lives_on() {
    let c = cluster(|_| {}).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    sock.connect(c.dns).await.expect("connect");
    let mut buf = [0u8; 1500];
    // A header promising a question that is cut off: FORMERR with our id.
    sock.send(&[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 9, b'x'])
        .await
        .expect("send");
    let n = within("a FORMERR", sock.recv(&mut buf))
        .await
        .expect("recv");
    assert_eq!(&buf[..2], &[0x12, 0x34]);
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    assert!(n >= 12);
    // Garbage of every length, and a compression loop: never a crash.
    let mut junk: Vec<Vec<u8>> = (0..64u8)
        .map(|n| (0..n).map(|i| i.wrapping_mul(37)).collect())
        .collect();
    junk.push(vec![
        0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ]);
    for j in &junk {
        sock.send(j).await.expect("send");
    }
    // A header with no question parses: our handler's FORMERR, counted.
    // (FORMERR for what cannot be parsed comes from hickory-server before
    // the handler, so it is not in our metrics.)
    sock.send(&[0x56, 0x78, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0])
        .await
        .expect("send");
    loop {
        let n = within("a FORMERR", sock.recv(&mut buf))
            .await
            .expect("recv");
        if buf[..2] == [0x56, 0x78] {
            assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
            assert!(n >= 12);
            break;
        }
    }
    let over_tcp = dig(c.dns, &["+tcp", "web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(over_tcp.status, "NOERROR");
    let d = dig(c.dns, &["web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.status, "NOERROR", "still serving: {}", d.raw);
    let metrics = get_text(c.agent.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_agent_dns_responses_total{rcode=\"FORMERR\"}"),
        "{metrics}"
    );
}

/// Runs `ip netns exec NS ARGS...`.
fn netns_exec(ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec")
}

/// Starts the agent binary in `ns` with the default (link-local) DNS
/// address; returns it once its stub listens, with the log lines seen.
async fn agent_in_netns(
    ns: &str,
    state: &std::path::Path,
    resolv_conf: &std::path::Path,
) -> (tokio::process::Child, Vec<String>) {
    let mut agent = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_netns_agent")])
        .args([
            "--node-name",
            "ns-node",
            "--control-plane",
            "http://127.0.0.1:1",
        ])
        .args(["--state-dir", &state.display().to_string()])
        .args(["--admin-listen", "127.0.0.1:9902"])
        .args(["--resolv-conf", &resolv_conf.display().to_string()])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent starts");
    let stdout = agent.stdout.take().expect("stdout");
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let seen = within("the agent's DNS stub to listen", async {
        let mut seen = Vec::new();
        while let Some(l) = lines.next_line().await.expect("read") {
            let done = l.contains("DNS stub listening");
            seen.push(l);
            if done {
                return seen;
            }
        }
        panic!("agent exited: {seen:?}");
    })
    .await;
    (agent, seen)
}

/// The default listen address inside a network namespace made for the
/// test: the agent puts 169.254.20.10 on its interface, adds the NOTRACK
/// rules (once, also when started again), and answers there. Its
/// resolv.conf names only the stub itself: it says so at start and in
/// `/status`, and other names get SERVFAIL at once. `cleanup` then removes
/// the rules and the address. Skipped (with a note) where namespaces
/// cannot be made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_local_default_in_a_network_namespace() {
    init_logging();
    let Some(netns) = bench::Netns::try_new("dns") else {
        eprintln!("skipping: cannot create a network namespace here");
        return;
    };
    let ns = netns.0.clone();
    let exec = |args: &[&str]| netns_exec(&ns, args);
    assert!(exec(&["ip", "link", "set", "lo", "up"]).status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    // The usual NodeLocal DNSCache set-up: the node's resolver is the stub.
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 169.254.20.10\nsearch cluster.local\n").expect("write");
    let state = dir.path().join("a");

    let (mut agent, log) = agent_in_netns(&ns, &state, &resolv).await;
    assert!(
        log.iter().any(|l| l.contains("ERROR")
            && l.contains("no upstream DNS server")
            && l.contains("names only this stub (169.254.20.10)")),
        "a loud warning at start: {log:#?}"
    );
    // Started a second time: the same rules, not twice.
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let (mut agent, _) = agent_in_netns(&ns, &state, &resolv).await;

    let addrs = String::from_utf8_lossy(&exec(&["ip", "-o", "addr"]).stdout).to_string();
    assert!(addrs.contains("169.254.20.10/32"), "{addrs}");
    let raw = String::from_utf8_lossy(&exec(&["iptables", "-t", "raw", "-S"]).stdout).to_string();
    for rule in [
        "-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53",
        "-A PREROUTING -d 169.254.20.10/32 -p tcp -m tcp --dport 53",
        "-A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53",
        "-A OUTPUT -d 169.254.20.10/32 -p udp -m udp --dport 53",
    ] {
        assert_eq!(raw.matches(rule).count(), 1, "{rule:?} once in\n{raw}");
    }
    assert_eq!(raw.matches("-j NOTRACK").count(), 6, "{raw}");

    let status = exec(&[
        env!("CARGO_BIN_EXE_sy_echo"),
        "http",
        "127.0.0.1:9902",
        "/status",
    ]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let body: serde_json::Value = serde_json::from_str(
        status
            .trim()
            .split_once(' ')
            .map_or("null", |(_, body)| body),
    )
    .unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(body["dns"]["upstreams"], serde_json::json!([]), "{body}");
    assert!(
        body["dns"]["upstream_warning"]
            .as_str()
            .is_some_and(|w| w.contains("no upstream DNS server")),
        "{body}"
    );

    let dig_at = |name: &str| {
        let out = exec(&["dig", "@169.254.20.10", "+tries=1", "+time=2", name]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = dig_at("web.shop.svc.cluster.local");
    assert!(text.contains("status: SERVFAIL"), "no snapshot yet: {text}");
    // With no upstream, other names fail at once instead of timing out.
    let text = dig_at("www.example.org");
    assert!(text.contains("status: SERVFAIL"), "{text}");
    let _ = agent.start_kill();
    let _ = agent.wait().await;

    // Cleanup removes what the stub put on the node.
    let out = exec(&[env!("CARGO_BIN_EXE_sy_agent"), "cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = String::from_utf8_lossy(&exec(&["iptables-save", "-t", "raw"]).stdout).to_string();
    assert!(!raw.contains("switchyard-dns"), "{raw}");
    let addrs = String::from_utf8_lossy(&exec(&["ip", "-o", "addr"]).stdout).to_string();
    assert!(!addrs.contains("169.254.20.10"), "{addrs}");
    assert!(
        !exec(&["ip", "link", "show", "nodelocaldns"])
            .status
            .success()
    );
}
