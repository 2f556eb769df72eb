//! Bootstrap of a fresh node in a cluster without kube-proxy, in the
//! network-namespace cluster (root only; skipped otherwise): the control
//! plane's own Service is not reachable from a node whose agent has not run
//! yet, so the agent must dial an address outside the service network (what
//! `deploy/kubernetes/bootstrap.yaml` gives it); from there it programs
//! every Service, the control plane's included.

use switchyard_integration_tests::netns::{Bins, CONTROL_PLANE, Cluster, supported};

fn bins() -> Bins {
    Bins {
        agent: env!("CARGO_BIN_EXE_sy_agent").into(),
        control_plane: env!("CARGO_BIN_EXE_sy_control_plane").into(),
        echo: env!("CARGO_BIN_EXE_sy_echo").into(),
    }
}

/// The control plane's Service as an API server would publish it: a
/// cluster IP in front of the control plane's host address.
const CONTROL_PLANE_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  namespace: switchyard
  name: switchyard-control-plane
spec:
  clusterIP: 10.96.0.100
  ports:
  - name: grpc
    port: 18000
    targetPort: 18000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: switchyard
  name: switchyard-control-plane-1
  labels:
    kubernetes.io/service-name: switchyard-control-plane
addressType: IPv4
ports:
- name: grpc
  port: 18000
  protocol: TCP
endpoints:
- addresses: [\"10.99.0.1\"]
  conditions:
    ready: true
";

fn reachable(c: &Cluster, ns: &str, ip: &str, port: u16) -> bool {
    c.sh(
        &c.ns(ns),
        &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo open"),
    )
    .contains("open")
}

#[test]
fn a_fresh_node_reaches_the_control_plane_without_service_rules() {
    if !supported() {
        eprintln!("skipping: packet tests need root, iproute2 and iptables");
        return;
    }
    let mut c = Cluster::new(bins(), 1);
    c.write_manifest("control-plane.yaml", CONTROL_PLANE_SERVICE);
    c.start_control_plane();
    let (host, port) = CONTROL_PLANE.split_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    c.wait_until("the control plane to listen", || {
        reachable(&c, "n1", host, port)
    });

    // A fresh node: no state directory, no rules of ours.
    assert!(!c.dir.path().join("node-1").exists(), "fresh state");
    assert!(!c.rules(1).contains("SWY-"), "no rules yet");
    // Through its Service the control plane is out of reach: nothing
    // programs the cluster IP before the agent runs.
    assert!(
        !reachable(&c, "n1", "10.96.0.100", 18000),
        "the cluster IP must not answer before the agent ran"
    );

    // The agent dials the bootstrap address and programs the node.
    c.start_agent(1);
    c.wait_rules("the control plane's Service in the rules", "10.96.0.100/32");
    assert!(
        reachable(&c, "n1", "10.96.0.100", 18000),
        "after the first sync the Service works too"
    );
}
