//! The docker-compose testbed end to end, with real containers: what a
//! user of `scripts/testbed.sh up` sees. Runs when `SWITCHYARD_TESTBED=1`
//! (`scripts/test.sh` sets it where a Docker engine answers and builds
//! the image first); skipped with a message otherwise.
//!
//! One test, in steps, because the steps share one testbed and build on
//! each other (the control plane stays down while node2 restarts): every
//! replica reached by name, short name and cluster IP, scaling 3 -> 5 ->
//! 2, a container with bad labels, the control plane killed under a
//! request loop, a node restarted from its volume while the control plane
//! is down, and the return of the control plane.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::time::Instant;

use serde_json::Value;
use switchyard_integration_tests::testbed::Testbed;

/// The host names that answered `n` requests to `url` from the client,
/// and how many requests failed.
fn spread(tb: &Testbed, url: &str, n: usize) -> (BTreeSet<String>, usize) {
    let out = tb.sh(
        "client",
        &format!("for i in $(seq {n}); do curl -fsS -m 2 {url} || echo FAIL; done"),
    );
    let mut names = BTreeSet::new();
    let mut failed = 0;
    for line in out.lines() {
        if line == "FAIL" || line.starts_with("curl:") {
            failed += 1;
        } else {
            names.insert(line.trim().to_owned());
        }
    }
    (names, failed)
}

fn hostnames(tb: &Testbed, service: &str) -> BTreeSet<String> {
    tb.containers(service).into_iter().map(|(_, h)| h).collect()
}

fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// Every one of the three agents is connected and has ACKed the current
/// snapshot; returns the version.
fn all_acked(status: &Value) -> Option<String> {
    let version = status["version"].as_str()?;
    let agents = status["agents"].as_array()?;
    let acked = agents
        .iter()
        .filter(|a| a["connected"] == true && a["acked_version"] == version)
        .count();
    (acked == 3).then(|| version.to_owned())
}

/// Waits until the control plane serves `web` with exactly `n` ready
/// endpoints and every agent ACKed that snapshot; returns the seconds
/// since `since`.
fn wait_web_endpoints(tb: &Testbed, n: u64, since: Instant) -> f64 {
    tb.wait_for(
        &format!("web with {n} ready endpoints ACKed by every agent"),
        || {
            let s = tb.status();
            let web = service(&s, "default/web")?;
            (web["ready_endpoints"] == n && web["endpoints"] == n && all_acked(&s).is_some())
                .then(|| since.elapsed().as_secs_f64())
        },
    )
}

#[test]
fn compose_testbed_end_to_end() {
    let Some(mut tb) = Testbed::up("sytestbed", "10.211.0") else {
        return;
    };

    // 1. Name, short name and cluster IP reach every replica.
    let status = tb.status();
    let web = service(&status, "default/web")
        .expect("web in /status")
        .clone();
    let cluster_ip = web["cluster_ips"][0]
        .as_str()
        .expect("cluster IP")
        .to_owned();
    assert_eq!(web["ready_endpoints"], 3, "{web}");
    let replicas = hostnames(&tb, "web");
    assert_eq!(replicas.len(), 3);
    for url in [
        "http://web/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        format!("http://{cluster_ip}/"),
    ] {
        let (names, failed) = spread(&tb, &url, 30);
        assert_eq!(failed, 0, "{url}");
        assert_eq!(names, replicas, "{url} must reach every replica");
    }
    // The resolver the client has is node1's stub, with a pod's search path.
    let resolv = tb.sh("client", "cat /etc/resolv.conf");
    assert!(
        resolv.contains("nameserver 169.254.20.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    let dig = tb.sh("client", "dig +short web.default.svc.cluster.local");
    assert_eq!(dig.trim(), cluster_ip);
    // Names outside the cluster zone go on to Docker's DNS.
    let node2 = tb.sh("client", "getent hosts node2");
    assert!(
        node2.contains(&format!("{}.", tb.net())),
        "node2: {node2:?}"
    );
    // A Service declared in YAML, endpoints from a labelled container.
    let api = hostnames(&tb, "api");
    let (names, failed) = spread(&tb, "http://api/", 5);
    assert_eq!((names, failed), (api, 0), "api (testbed/services/api.yaml)");

    // 2. Scale 3 -> 5 -> 2: the client reaches exactly the live replicas.
    let t = Instant::now();
    tb.compose(&["up", "-d", "--no-recreate", "--scale", "web=5", "web"]);
    let up = wait_web_endpoints(&tb, 5, t);
    let replicas = hostnames(&tb, "web");
    assert_eq!(replicas.len(), 5);
    let (names, failed) = spread(&tb, "http://web/", 60);
    assert_eq!((&names, failed), (&replicas, 0), "after scaling to 5");

    let t = Instant::now();
    tb.compose(&["up", "-d", "--no-recreate", "--scale", "web=2", "web"]);
    let down = wait_web_endpoints(&tb, 2, t);
    let replicas = hostnames(&tb, "web");
    assert_eq!(replicas.len(), 2);
    let (names, failed) = spread(&tb, "http://web/", 30);
    assert_eq!((&names, failed), (&replicas, 0), "after scaling to 2");
    eprintln!(
        "scale command until every agent ACKed the endpoints: 3->5 {up:.2} s (health checks every 2 s included), 5->2 {down:.2} s (compose stops with a 10 s grace)"
    );

    // 3. A container with bad labels is reported; the rest keeps flowing.
    tb.run_extra(
        "bad",
        &[
            "--label",
            "switchyard.io/service=web",
            "--label",
            "switchyard.io/ports=http=eighty",
        ],
    );
    let bad = format!("container {}_bad", tb.project());
    let reported = tb.wait_for("the bad container in invalid_objects", || {
        let s = tb.status();
        s["invalid_objects"]
            .as_array()?
            .iter()
            .find(|e| e["object"] == bad.as_str())
            .cloned()
    });
    assert_eq!(reported["field"], "labels[\"switchyard.io/ports\"]");
    assert!(
        reported["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"eighty\" is not a port number")),
        "{reported}"
    );
    let s = tb.status();
    assert_eq!(service(&s, "default/web").expect("web")["endpoints"], 2);
    let (names, failed) = spread(&tb, "http://web/", 20);
    assert_eq!((&names, failed), (&replicas, 0), "with a bad container");

    // 4. The control plane dies under a request loop: nothing fails.
    let acked = all_acked(&tb.status()).expect("every agent ACKed");
    let mut looping = tb.spawn(
        "client",
        "for i in $(seq 150); do curl -fsS -m 2 -o /dev/null http://web/ && echo ok || echo FAIL; done; echo END",
    );
    let mut lines = BufReader::new(looping.stdout.take().expect("stdout")).lines();
    let mut results = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("loop output");
        let done = line == "END";
        results.push(line);
        if results.len() == 30 {
            let out = tb.docker(&["kill", &tb.container("control-plane")]);
            assert!(out.status.success(), "docker kill");
        }
        if done {
            break;
        }
    }
    looping.wait().expect("loop");
    let failed = results.iter().filter(|l| *l == "FAIL").count();
    assert_eq!(
        (failed, results.len()),
        (0, 151),
        "requests across the kill"
    );
    let after = tb.sh("client", "getent hosts web.default.svc.cluster.local node2");
    assert!(
        after.contains(&cluster_ip) && after.lines().count() == 2,
        "names resolve with the control plane down: {after:?}"
    );

    // 5. With the control plane still down, node2 restarts from its volume.
    let node2 = tb.container("node2");
    let out = tb.docker(&["restart", "-t", "2", &node2]);
    assert!(out.status.success(), "docker restart node2");
    let agent = tb.wait_for("node2's agent serving its persisted state", || {
        let s = tb.agent_status("node2");
        (s["origin"] == "persisted").then_some(s)
    });
    assert_eq!(agent["version"], acked.as_str(), "{agent}");
    assert_eq!(agent["connected"], false, "{agent}");
    let nat = tb.sh("node2", "iptables -t nat -S");
    assert!(
        nat.contains("SWY-SERVICES") && nat.contains("DNAT"),
        "node2's nat table after the restart:\n{nat}"
    );
    let from_node2 = tb.sh("node2", &format!("curl -fsS -m 2 http://{cluster_ip}/"));
    assert!(
        replicas.contains(from_node2.trim()),
        "node2 reaches web from its persisted rules: {from_node2:?}"
    );

    // 6. The control plane returns: every agent reconnects and ACKs.
    tb.compose(&["start", "control-plane"]);
    let version = tb.wait_for("every agent reconnected and ACKed", || {
        all_acked(&tb.status())
    });
    let s = tb.status();
    assert_eq!(
        service(&s, "default/web").expect("web")["cluster_ips"][0],
        cluster_ip.as_str(),
        "the cluster IP is sticky across a control-plane restart"
    );
    let node2_now = tb.wait_for("node2 ACKed from the control plane", || {
        let a = tb.agent_status("node2");
        (a["origin"] == "control-plane" && a["version"] == version.as_str()).then_some(a)
    });
    assert_eq!(node2_now["connected"], true);
    let (names, failed) = spread(&tb, "http://web/", 20);
    assert_eq!(
        (&names, failed),
        (&replicas, 0),
        "after the control plane returned"
    );
}
