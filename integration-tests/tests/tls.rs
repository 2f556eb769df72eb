//! TLS end to end: node certificates in Kubernetes' form, the cluster a
//! certificate fixes, certificates and keys reloaded under running streams,
//! and handshake failures named on both sides; with a `kube` source,
//! Nodes that must exist and cluster annotations that move nothing.

use std::path::{Path, PathBuf};

use switchyard_control_plane::ControlPlane;
use switchyard_integration_tests::certs::TestCa;
use switchyard_integration_tests::*;

async fn current_version(cp: &ControlPlane) -> String {
    cp_status_until(cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version")
}

fn web_env() -> TestEnv {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env
}

fn https(cp: &ControlPlane) -> String {
    format!("https://localhost:{}", cp.grpc_addr.port())
}

fn tls_agent(
    env: &TestEnv,
    cp_url: &str,
    node: &str,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> switchyard_agent::Args {
    let mut a = agent_args(node, cp_url, &env.state(node));
    a.tls_ca = Some(ca.to_owned());
    if let Some((c, k)) = identity {
        a.tls_cert = Some(c);
        a.tls_key = Some(k);
    }
    a
}

async fn refusal(agent: &switchyard_agent::Agent) -> String {
    agent_status_until(agent, "the agent to report a refusal", |s| {
        s.last_error.is_some()
    })
    .await
    .last_error
    .expect("error")
}

async fn metric_appears(cp: &ControlPlane, needle: &str) {
    let mut rx = cp.status.subscribe();
    within(&format!("metric {needle}"), async {
        loop {
            if cp.metrics.encode().contains(needle) {
                return;
            }
            // Handshake failures are not status changes: look again on the
            // next status change or after a short while.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.changed()).await;
        }
    })
    .await;
}

/// Copies `from` over `to` by write-then-rename, as a Secret volume or
/// kubelet's rotation does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_must_be_in_kubernetes_form_and_fix_the_cluster() {
    let env = web_env();
    let ca = TestCa::new(env.dir.path());
    let (cert, key) = ca.server();
    let tls = ServerTls {
        cert,
        key,
        client_ca: Some(ca.ca_pem.clone()),
    };
    let mut args = cp_args(&env.manifests(), &env.state("cp"), Some(&tls));
    args.tls_client_organizations = vec!["system:nodes".into(), "switchyard:nodes".into()];
    let cp = start_cp(args).await;
    let v1 = current_version(&cp).await;
    let url = https(&cp);

    // O=system:nodes, CN=system:node:node-a: served.
    let (kube_form, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-a",
        &ca.ca_pem,
        Some(ca.client("node-a")),
    ))
    .await;
    agent_at_version(&kube_form, &v1).await;
    // A configured organisation, and a SAN naming the served cluster: served.
    let (custom, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-b",
        &ca.ca_pem,
        Some(ca.node_cert("b", "node-b", "switchyard:nodes", Some("default"))),
    ))
    .await;
    agent_at_version(&custom, &v1).await;

    // A bare Common Name is not a node certificate.
    let (plain, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-c",
        &ca.ca_pem,
        Some(ca.plain_client("c", "node-c")),
    ))
    .await;
    let e = refusal(&plain).await;
    assert!(
        e.contains("Unauthenticated") && e.contains("system:node:NODE"),
        "{e}"
    );
    // Another organisation is not either.
    let (masters, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-d",
        &ca.ca_pem,
        Some(ca.node_cert("d", "node-d", "system:masters", None)),
    ))
    .await;
    let e = refusal(&masters).await;
    assert!(e.contains("system:masters"), "{e}");
    // A certificate that fixes another cluster than the one claimed.
    let (elsewhere, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-e",
        &ca.ca_pem,
        Some(ca.node_cert("e", "node-e", "system:nodes", Some("prod-eu"))),
    ))
    .await;
    let e = refusal(&elsewhere).await;
    assert!(
        e.contains("PermissionDenied") && e.contains("fixes cluster \"prod-eu\""),
        "{e}"
    );
    let m = cp.metrics.encode();
    // Exported at 0 from the start: counted, not merely present.
    assert!(
        m.contains("streams_refused_total{reason=\"identity\"} ")
            && !m.contains("streams_refused_total{reason=\"identity\"} 0\n"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_both_sides_without_dropping_streams() {
    let env = web_env();
    let dir = env.dir.path();
    let old_ca = TestCa::new(&dir.join("old"));
    let new_ca = TestCa::new(&dir.join("new"));
    // The files both sides read; rotations replace their content.
    let server_cert = dir.join("tls.crt");
    let server_key = dir.join("tls.key");
    let client_ca = dir.join("client-ca.crt");
    let (c, k) = old_ca.server();
    replace(&c, &server_cert);
    replace(&k, &server_key);
    replace(&old_ca.ca_pem, &client_ca);
    let tls = ServerTls {
        cert: server_cert.clone(),
        key: server_key.clone(),
        client_ca: Some(client_ca.clone()),
    };
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), Some(&tls))).await;
    let v1 = current_version(&cp).await;
    let url = https(&cp);
    let port = cp.grpc_addr.port();

    // Agent a: trusts both CAs (a bundle), its certificate from the old CA.
    let bundle = dir.join("bundle.pem");
    std::fs::write(
        &bundle,
        [
            std::fs::read(&old_ca.ca_pem).expect("read"),
            std::fs::read(&new_ca.ca_pem).expect("read"),
        ]
        .concat(),
    )
    .expect("bundle");
    let a_cert = dir.join("a.crt");
    let a_key = dir.join("a.key");
    let (c, k) = old_ca.client("node-a");
    replace(&c, &a_cert);
    replace(&k, &a_key);
    let (a, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-a",
        &bundle,
        Some((a_cert.clone(), a_key.clone())),
    ))
    .await;
    agent_at_version(&a, &v1).await;

    // The control plane's certificate rotates to one from the new CA: an
    // agent that trusts only the new CA is served, without a restart.
    let (c, k) = new_ca.server();
    replace(&c, &server_cert);
    replace(&k, &server_key);
    let (b, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-b",
        &new_ca.ca_pem,
        Some(old_ca.client("node-b")),
    ))
    .await;
    agent_at_version(&b, &v1).await;

    // Agent a's stream was not dropped: it still follows changes on it.
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
    agent_at_version(&a, &v2).await;
    let m = get_text(a.admin_addr, "/metrics").await.1;
    assert!(
        m.contains("switchyard_agent_connects_total 1"),
        "one connection only: {m}"
    );

    // Now the client side rotates: agent a's certificate comes from the new
    // CA, and the control plane's client CA becomes the new one. A control
    // plane restarted on the same port accepts only the new certificate; the
    // agent, without a restart, presents it.
    let (c, k) = new_ca.client("node-a");
    replace(&c, &a_cert);
    replace(&k, &a_key);
    replace(&new_ca.ca_pem, &client_ca);
    cp.kill().await;
    let cp = start_cp_on(
        cp_args(&env.manifests(), &env.state("cp"), Some(&tls)),
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let v3 = current_version(&cp).await;
    agent_at_version(&a, &v3).await;
    cp_status_until(&cp, "node-a connected with its new certificate", |s| {
        s.agents.iter().any(|x| x.node == "node-a" && x.connected)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_name_their_cause_on_both_sides() {
    let env = web_env();
    let ca = TestCa::new(env.dir.path());
    let other_ca = TestCa::new(&env.dir.path().join("other"));
    let (cert, key) = ca.server();
    let mtls = ServerTls {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(ca.ca_pem.clone()),
    };
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), Some(&mtls))).await;
    current_version(&cp).await;
    let url = https(&cp);

    // The control plane's certificate from a CA the agent does not trust.
    let (unknown, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "n1",
        &other_ca.ca_pem,
        Some(ca.client("n1")),
    ))
    .await;
    let e = refusal(&unknown).await;
    assert!(
        e.contains("not signed by a CA in --tls-ca") && e.contains("unknown issuer"),
        "{e}"
    );
    metric_appears(&cp, "reason=\"client_refused_server_certificate\"").await;

    // A name the certificate does not hold.
    let mut wrong_name = tls_agent(&env, &url, "n2", &ca.ca_pem, Some(ca.client("n2")));
    wrong_name.tls_server_name = Some("cp.example".into());
    let (wrong_name, _) = start_recording_agent(wrong_name).await;
    let e = refusal(&wrong_name).await;
    assert!(
        e.contains("not valid for the name \"cp.example\"") && e.contains("localhost"),
        "{e}"
    );

    // No client certificate against mutual TLS.
    let (anonymous, _) = start_recording_agent(tls_agent(&env, &url, "n3", &ca.ca_pem, None)).await;
    let e = refusal(&anonymous).await;
    assert!(
        e.contains("client certificate") && e.contains("--tls-cert"),
        "{e}"
    );
    metric_appears(&cp, "reason=\"no_client_certificate\"").await;

    // A client certificate from another CA.
    let (foreign, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "n4",
        &ca.ca_pem,
        Some(other_ca.client("n4")),
    ))
    .await;
    let e = refusal(&foreign).await;
    assert!(e.contains("refused our client certificate"), "{e}");
    metric_appears(&cp, "reason=\"unknown_ca\"").await;

    // Clear text against the TLS server.
    let (clear, _) = start_recording_agent(agent_args(
        "n5",
        &format!("http://127.0.0.1:{}", cp.grpc_addr.port()),
        &env.state("n5"),
    ))
    .await;
    let e = refusal(&clear).await;
    assert!(e.contains("clear text") && e.contains("https://"), "{e}");
    metric_appears(&cp, "reason=\"clear_text\"").await;

    // TLS against a clear-text server.
    let plain_cp = start_cp(env.cp_args()).await;
    current_version(&plain_cp).await;
    let (tls_to_plain, _) = start_recording_agent(tls_agent(
        &env,
        &format!("https://localhost:{}", plain_cp.grpc_addr.port()),
        "n6",
        &ca.ca_pem,
        None,
    ))
    .await;
    let e = refusal(&tls_to_plain).await;
    assert!(e.contains("did not answer in TLS"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_kube_source_the_node_must_exist_and_annotations_move_nothing() {
    use serde_json::json;
    use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::default();
    store
        .create(
            Kind::Node,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
        )
        .expect("node");
    // Whoever may edit a Service must not move it into another cluster's view.
    store
        .create(
            Kind::Service,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"namespace": "shop", "name": "web",
                                "annotations": {"switchyard.io/cluster": "prod-eu"}},
                   "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}),
        )
        .expect("service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("starts");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let ca = TestCa::new(&dir.path().join("pki"));
    let (cert, key) = ca.server();
    let ca_path = ca.ca_pem.display().to_string();
    let cp = start_cp(kube_cp_args(
        &kubeconfig,
        &dir.path().join("cp"),
        &[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--tls-client-ca",
            &ca_path,
        ],
    ))
    .await;
    let v1 = current_version(&cp).await;
    let doc = cp.status.document();
    assert_eq!(
        doc.services
            .iter()
            .map(|s| (s.cluster.as_str(), s.name.as_str()))
            .collect::<Vec<_>>(),
        [("default", "shop/web")],
        "the annotation is ignored"
    );
    let env = TestEnv::new();
    let url = https(&cp);

    let (known, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-a",
        &ca.ca_pem,
        Some(ca.client("node-a")),
    ))
    .await;
    agent_at_version(&known, &v1).await;

    // A valid certificate for a node the API server does not know: refused.
    let (unknown, _) = start_recording_agent(tls_agent(
        &env,
        &url,
        "node-z",
        &ca.ca_pem,
        Some(ca.client("node-z")),
    ))
    .await;
    let e = refusal(&unknown).await;
    assert!(
        e.contains("PermissionDenied")
            && e.contains("\"node-z\" is not a Node of cluster \"default\""),
        "{e}"
    );
    cp_status_until(&cp, "node-z shown as refused", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-z" && a.refused.is_some())
    })
    .await;
    // Once the Node is registered, its agent is served (after its backoff).
    api.store()
        .create(
            Kind::Node,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-z"}}),
        )
        .expect("node");
    cp_status_until(&cp, "node-z served once its Node exists", |s| {
        s.agents
            .iter()
            .any(|a| a.node == "node-z" && a.connected && a.acked_version.is_some())
    })
    .await;
}
