//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`, seeds and every
//! input AFL++ kept or found) through the fuzz targets' own bodies, so CI
//! checks each one without installing or running AFL++ (`scripts/fuzz.sh`
//! does that, by hand). Crashes found later are saved there too, named
//! `crash-*`, and stay as regression inputs.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/targets.rs"]
mod targets;

/// A target's body.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("dns_handler", targets::dns_handler),
    ("update_decoder", targets::update_decoder),
    ("manifest_loader", targets::manifest_loader),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_saved_input_runs_through_its_target() {
    for (target, run) in TARGETS {
        let dir = corpus(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(
            !inputs.is_empty(),
            "{target}: no saved inputs in {}",
            dir.display()
        );
        for input in &inputs {
            let data = std::fs::read(input).expect("read");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", input.display());
        }
        eprintln!("{target}: {} inputs replayed", inputs.len());
    }
}

/// Writes the seed inputs (`cargo test -p switchyard-integration-tests
/// --test fuzz_corpus -- --ignored`): real messages the targets should
/// start from.
#[test]
#[ignore]
fn write_seeds() {
    use prost::Message;
    let dns = corpus("dns_handler");
    std::fs::create_dir_all(&dns).expect("mkdir");
    let query = |id: u16, name: &str, qtype: u16| {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.').filter(|l| !l.is_empty()) {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    };
    let seeds = [
        ("seed-a", query(1, "web.shop.svc.cluster.local", 1)),
        ("seed-aaaa", query(2, "web.shop.svc.cluster.local", 28)),
        (
            "seed-srv",
            query(3, "_http._tcp.web.shop.svc.cluster.local", 33),
        ),
        ("seed-headless", query(4, "db.shop.svc.cluster.local", 1)),
        ("seed-ptr", query(5, "10.0.96.10.in-addr.arpa", 12)),
        ("seed-cname", query(6, "pay.shop.svc.cluster.local", 1)),
        ("seed-nxdomain", query(7, "nope.shop.svc.cluster.local", 1)),
        ("seed-forward", query(8, "example.org", 1)),
        ("seed-soa", query(9, "cluster.local", 6)),
        ("seed-short", vec![0, 1, 2]),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dns.join(name), bytes).expect("write");
    }

    let updates = corpus("update_decoder");
    std::fs::create_dir_all(&updates).expect("mkdir");
    let web = switchyard_model::ServiceState::new(switchyard_model::Service {
        cluster_ips: vec!["10.96.0.20".parse().expect("ip")],
        ports: vec![switchyard_model::ServicePort {
            name: "http".into(),
            protocol: switchyard_model::Protocol::Tcp,
            port: 80,
            target_port: switchyard_model::TargetPort::Number(8080),
            node_port: Some(30080),
        }],
        ..switchyard_model::Service::new(switchyard_model::ServiceKey::new(
            "default", "shop", "api",
        ))
    });
    let resource = switchyard_proto::v1::Resource {
        name: "default/shop/api".into(),
        version: "0123456789abcdef".into(),
        service_state: switchyard_proto::convert::encode_state_bytes(&web),
    };
    let update = |resources: Vec<switchyard_proto::v1::Resource>, removed: Vec<String>| {
        switchyard_proto::v1::SnapshotUpdate {
            snapshot_version: "e-2".into(),
            nonce: "1".into(),
            resources,
            removed_resources: removed,
            changed_at_unix_nanos: 1,
            ..Default::default()
        }
        .encode_to_vec()
    };
    std::fs::write(
        updates.join("seed-add"),
        update(vec![resource.clone()], vec![]),
    )
    .expect("write");
    std::fs::write(
        updates.join("seed-remove"),
        update(vec![], vec!["default/shop/web".into()]),
    )
    .expect("write");
    let mut misnamed = resource;
    misnamed.name = "default/shop/other".into();
    std::fs::write(
        updates.join("seed-misnamed"),
        update(vec![misnamed], vec![]),
    )
    .expect("write");

    let manifests = corpus("manifest_loader");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop.yaml");
    std::fs::copy(examples, manifests.join("seed-shop.yaml")).expect("copy");
    std::fs::write(
        manifests.join("seed-list.yaml"),
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {ports: [{port: 80}]}\n",
    )
    .expect("write");
    std::fs::write(
        manifests.join("seed-slice.yaml"),
        switchyard_integration_tests::service_yaml("ns", "web", 80, &["10.244.0.1", "fd00::1"]),
    )
    .expect("write");
}
