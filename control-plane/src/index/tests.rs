//! The index's tests: full builds and patches compared with what a fresh
//! index makes of the same sources, the clusterset's imports and their
//! ClusterSet IPs, and the run loop's hold on sources and threads.

use std::net::IpAddr;
use std::time::Instant;

use switchyard_model::{Endpoint, EndpointSlice, Protocol, Service, ServicePort, TargetPort};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::run::{BuildHook, run_with};
use super::*;
use crate::merge;
use crate::metrics::Metrics;
use crate::snapshot::View;
use crate::source::{SlicePorts, SourceSlice, SourceState};
use crate::status::Status;

fn source(n: usize) -> SourceState {
    let mut state = SourceState {
        synced: true,
        ..SourceState::default()
    };
    for i in 0..n {
        let key = ServiceKey::new("default", "ns", format!("s{i}"));
        state.services.push(Arc::new(Service {
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port: None,
            }],
            ..Service::new(key.clone())
        }));
        state.slices.push(Arc::new(SourceSlice {
            service: key,
            slice: EndpointSlice {
                name: format!("s{i}-1"),
                endpoints: vec![Endpoint {
                    addresses: vec![format!("10.244.0.{}", i + 1).parse().expect("ip")].into(),
                    ..Endpoint::default()
                }],
                ..EndpointSlice::default()
            },
            ports: SlicePorts::AsGiven,
        }));
    }
    state
}

/// The key of the one slice of Service `s{i}` in [`source`].
fn slice_key(i: usize) -> crate::source::SliceKey {
    (
        ServiceKey::new("default", "ns", format!("s{i}")),
        format!("s{i}-1"),
    )
}

/// Name -> content version of every resource.
fn versions(snap: &Snapshot) -> Vec<(String, String)> {
    snap.resources
        .iter()
        .map(|(n, r)| (n.to_string(), r.version.clone()))
        .collect()
}

#[test]
fn an_endpoint_change_is_patched_in_as_a_full_build_would_make_it() {
    let mut idx = index();
    let mut state = source(50);
    let first = build(&mut idx, &[("t", &state)], 1);
    assert!(!first.patched, "the first build is a full one");
    let first = first.snapshot.expect("first snapshot");

    // An endpoint moves: patched, and the same as a fresh index makes it.
    state.slices.modify(&slice_key(7), |s| {
        s.slice.endpoints[0].addresses = vec!["10.244.9.9".parse().expect("ip")].into();
    });
    let b = build(&mut idx, &[("t", &state)], 2);
    assert!(b.patched, "an endpoint change is patched in");
    let second = b.snapshot.expect("a change");
    let fresh = build(&mut index(), &[("t", &state)], 2)
        .snapshot
        .expect("a snapshot");
    assert_eq!(versions(&second), versions(&fresh));
    for (name, r) in &second.resources {
        let same = Arc::ptr_eq(r, &first.resources[name]);
        assert_eq!(same, &**name != "default/ns/s7", "{name}");
    }
    let delta = second.delta_from(&first, &View::Agent("default".into()));
    let changed: Vec<&str> = delta.changed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(changed, ["default/ns/s7"]);
    assert!(delta.removed.is_empty());

    // An endpoint without addresses makes its Service invalid: it leaves
    // the snapshot with an error naming the field, and comes back.
    state
        .slices
        .modify(&slice_key(3), |s| s.slice.endpoints[0].addresses.clear());
    let b = build(&mut idx, &[("t", &state)], 3);
    assert!(b.patched);
    let third = b.snapshot.expect("a change");
    assert!(!third.resources.contains_key("default/ns/s3"));
    assert_eq!(b.invalid.len(), 1, "{:?}", b.invalid);
    assert_eq!(b.invalid[0].field, "endpoints[0].addresses");
    assert_eq!(b.services.len(), 49);
    let delta = third.delta_from(&second, &View::Agent("default".into()));
    assert_eq!(delta.removed, vec![Arc::<str>::from("default/ns/s3")]);
    state.slices.modify(&slice_key(3), |s| {
        s.slice.endpoints[0].addresses = vec!["10.244.0.4".parse().expect("ip")].into();
    });
    let b = build(&mut idx, &[("t", &state)], 4);
    assert!(b.patched && b.invalid.is_empty() && b.services.len() == 50);
    let fourth = b.snapshot.expect("a change");
    assert_eq!(
        fourth.resources["default/ns/s3"].version,
        first.resources["default/ns/s3"].version
    );

    // A removed slice, and a slice of a Service no source has: patched.
    state.slices.remove(&slice_key(9));
    state.slices.push(Arc::new(SourceSlice {
        service: ServiceKey::new("default", "ns", "nobody"),
        ..(**state.slices.get(&slice_key(1)).expect("a slice")).clone()
    }));
    let b = build(&mut idx, &[("t", &state)], 5);
    assert!(b.patched);
    let fifth = b.snapshot.expect("a change");
    let fresh = build(&mut index(), &[("t", &state)], 5)
        .snapshot
        .expect("a snapshot");
    assert_eq!(versions(&fifth), versions(&fresh));

    // A Service change takes the full build.
    let key = ServiceKey::new("default", "ns", "s2");
    state.services.modify(&key, |s| s.ports[0].port = 81);
    let b = build(&mut idx, &[("t", &state)], 6);
    assert!(!b.patched, "a Service change is a full build");
    assert_eq!(
        versions(&b.snapshot.expect("a change")),
        versions(
            &build(&mut index(), &[("t", &state)], 6)
                .snapshot
                .expect("a snapshot")
        )
    );
}

/// While a build runs, a source publishes without waiting for it and the
/// runtime thread stays free: the build holds no source's lock and runs
/// off the runtime (this test runs on a one-thread runtime).
#[tokio::test]
async fn a_build_holds_no_source_lock_and_no_runtime_thread() {
    let (tx, rx) = watch::channel(source(10));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go) = std::sync::mpsc::channel::<()>();
    let go = Arc::new(std::sync::Mutex::new(go));
    let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Set when the held build was let go by the test, not by its timeout:
    // a build on the runtime thread would stall the test until then.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook: BuildHook = {
        let (builds, released) = (builds.clone(), released.clone());
        Arc::new(move || {
            // The second build (after the first change) waits for the test.
            if builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                started_tx.send(()).expect("test alive");
                let go = go
                    .lock()
                    .expect("lock")
                    .recv_timeout(std::time::Duration::from_secs(30));
                released.store(go.is_ok(), std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let (snap_tx, mut snaps) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_with(
        IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr")),
        vec![SourceFeed {
            name: "t".into(),
            cluster: "default".into(),
            state: rx,
        }],
        Outputs {
            snapshots: snap_tx,
            clusterset: watch::Sender::new(None),
        },
        Arc::new(Status::default()),
        Arc::new(Metrics::default()),
        shutdown.clone(),
        Some(hook),
    ));
    let wait = std::time::Duration::from_secs(10);
    tokio::time::timeout(wait, snaps.wait_for(Option::is_some))
        .await
        .expect("a first snapshot within 10 s")
        .expect("index alive");
    tx.send_modify(|s| {
        s.slices.modify(&slice_key(1), |s| {
            s.slice.endpoints[0].addresses = vec!["10.244.7.7".parse().expect("ip")].into();
        });
    });
    // This one-thread runtime goes on while the build waits in the hook.
    tokio::time::timeout(wait, started.recv())
        .await
        .expect("the runtime thread is free while a build runs")
        .expect("hook alive");
    // A source publishing meanwhile does not wait for the build.
    let publisher = std::thread::spawn(move || {
        tx.send_modify(|s| {
            s.slices.modify(&slice_key(2), |s| {
                s.slice.endpoints[0].addresses = vec!["10.244.8.8".parse().expect("ip")].into();
            });
        });
        tx
    });
    let deadline = Instant::now() + wait;
    while !publisher.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a source could not publish while a build ran"
        );
        tokio::task::yield_now().await;
    }
    let _tx = publisher.join().expect("publisher");
    go_tx.send(()).expect("hook waiting");
    // Both changes arrive, the second by the build after the held one.
    let both = |s: &Option<Arc<Snapshot>>| {
        s.as_ref().is_some_and(|s| {
            let has = |name: &str, ip: &str| {
                switchyard_proto::convert::decode_state_bytes(
                    name,
                    &s.resources[name].service_state,
                )
                .expect("decodes")
                .slices[0]
                    .endpoints[0]
                    .addresses[0]
                    .to_string()
                    == ip
            };
            has("default/ns/s1", "10.244.7.7") && has("default/ns/s2", "10.244.8.8")
        })
    };
    tokio::time::timeout(wait, snaps.wait_for(both))
        .await
        .expect("both changes published within 10 s")
        .expect("index alive");
    assert!(
        released.load(std::sync::atomic::Ordering::SeqCst),
        "the held build was released by its timeout: the test could not run while it was held"
    );
    shutdown.cancel();
    task.await.expect("index task");
}

fn index() -> Index {
    Index::new(&IndexConfig::in_memory(
        "10.96.0.0/16".parse().expect("cidr"),
    ))
}

/// Builds from `(source name, state)`s of cluster `default`, everything served.
fn build(idx: &mut Index, sources: &[(&str, &SourceState)], at: i64) -> Build {
    let inputs: Vec<Input<'_>> = sources
        .iter()
        .map(|(name, state)| Input {
            name,
            cluster: "default",
            state,
        })
        .collect();
    idx.build(&inputs, &Serving::all(&inputs), at)
}

#[test]
fn a_rebuild_touches_only_what_changed() {
    let mut idx = index();
    let mut state = source(20);
    let first = build(&mut idx, &[("t", &state)], 1)
        .snapshot
        .expect("first snapshot");
    assert_eq!(first.resources.len(), 20);
    assert!(
        build(&mut idx, &[("t", &state)], 2).snapshot.is_none(),
        "no change, no version"
    );

    state.slices.modify(&slice_key(7), |s| {
        s.slice.endpoints[0].addresses = vec!["10.244.9.9".parse().expect("ip")].into();
    });
    let second = build(&mut idx, &[("t", &state)], 3)
        .snapshot
        .expect("a change");
    for (name, r) in &second.resources {
        let same = Arc::ptr_eq(r, &first.resources[name]);
        assert_eq!(same, &**name != "default/ns/s7", "{name}");
    }
    // Allocated cluster IPs do not move.
    let ips = |snap: &Snapshot, name: &str| {
        switchyard_proto::convert::decode_state_bytes(name, &snap.resources[name].service_state)
            .expect("decodes")
            .service
            .cluster_ips
    };
    for name in first.resources.keys() {
        assert_eq!(ips(&first, name), ips(&second, name), "{name}");
        assert_eq!(ips(&first, name).len(), 1);
    }
}

#[test]
fn slices_of_another_source_take_the_services_target_ports() {
    let mut idx = index();
    let files = source(1);
    let key = files.services.first().expect("a Service").key.clone();
    let docker = SourceState {
        synced: true,
        slices: [Arc::new(SourceSlice {
            service: key,
            slice: EndpointSlice {
                name: "s0-docker-ipv4".into(),
                endpoints: vec![Endpoint {
                    addresses: vec!["172.30.0.5".parse().expect("ip")].into(),
                    ..Endpoint::default()
                }],
                ..EndpointSlice::default()
            },
            ports: SlicePorts::FromServiceTargets,
        })]
        .into_iter()
        .collect(),
        ..SourceState::default()
    };
    let build = build(&mut idx, &[("file", &files), ("docker", &docker)], 1);
    let snap = build.snapshot.expect("snapshot");
    let name = "default/ns/s0";
    let state =
        switchyard_proto::convert::decode_state_bytes(name, &snap.resources[name].service_state)
            .expect("decodes");
    let slice = state
        .slices
        .iter()
        .find(|s| s.name == "s0-docker-ipv4")
        .expect("the docker slice");
    assert_eq!(slice.port_for("", Protocol::Tcp), Some(8080));
    assert_eq!(build.services.len(), 1);
    assert_eq!(build.services.values().next().expect("one").endpoints, 2);
    assert_eq!(
        build.services.values().next().expect("one").ready_endpoints,
        2
    );
}

/// `source(1)` moved into cluster `cluster`, exporting its Service.
fn exporting(cluster: &str, endpoint: &str, created: i64) -> SourceState {
    let mut st = source(1);
    let key = ServiceKey::new(cluster, "ns", "s0");
    // Keys change: the objects go in again under their new keys.
    let mut svc = (**st.services.first().expect("a Service")).clone();
    let mut slice = (**st.slices.first().expect("a slice")).clone();
    svc.key = key.clone();
    slice.service = key.clone();
    slice.slice.endpoints[0].addresses = vec![endpoint.parse().expect("ip")].into();
    st.services = [Arc::new(svc)].into_iter().collect();
    st.slices = [Arc::new(slice)].into_iter().collect();
    st.exports.push(crate::source::Export {
        key,
        created_unix: Some(created),
        exported: Default::default(),
    });
    st
}

#[test]
fn exports_of_two_clusters_become_one_import_with_a_clusterset_ip() {
    let mut idx = index();
    let east = exporting("east", "10.1.0.1", 20);
    let west = exporting("west", "10.2.0.1", 10);
    let inputs = [
        Input {
            name: "kube=east",
            cluster: "east",
            state: &east,
        },
        Input {
            name: "kube=west",
            cluster: "west",
            state: &west,
        },
    ];
    let first = idx.build(&inputs, &Serving::all(&inputs), 1);
    let snap = first.snapshot.expect("snapshot");
    let name = "clusterset/ns/s0";
    let import =
        switchyard_proto::convert::decode_state_bytes(name, &snap.resources[name].service_state)
            .expect("an import");
    let ip = import.service.cluster_ips[0];
    assert!(
        "10.112.0.0/12"
            .parse::<IpNet>()
            .expect("cidr")
            .contains(&ip),
        "{ip}"
    );
    let mut clusters: Vec<_> = import.slices.iter().map(|s| s.cluster.clone()).collect();
    clusters.sort();
    assert_eq!(clusters, [Some("east".to_owned()), Some("west".to_owned())]);
    assert!(first.issues.is_empty(), "{:?}", first.issues);
    let summary = first
        .services
        .values()
        .find(|s| s.cluster == CLUSTERSET)
        .expect("listed");
    assert_eq!(summary.endpoints, 2);

    // Unchanged inputs: same resource, no new version.
    assert!(
        idx.build(&inputs, &Serving::all(&inputs), 2)
            .snapshot
            .is_none()
    );

    // East down past --cluster-down drop-after: its endpoints leave the
    // clusterset; its own view stays; the ClusterSet IP stays.
    let mut serving = Serving::all(&inputs);
    serving.dropped.insert("east".into());
    let dropped = idx.build(&inputs, &serving, 3).snapshot.expect("a change");
    let import =
        switchyard_proto::convert::decode_state_bytes(name, &dropped.resources[name].service_state)
            .expect("an import");
    assert_eq!(import.slices.len(), 1);
    assert_eq!(import.service.cluster_ips[0], ip);
    assert!(dropped.resources.contains_key("east/ns/s0"));

    // Before every source synced, the clusterset is not served.
    let mut partial = Serving::all(&inputs);
    partial.ready.remove(CLUSTERSET);
    let s = idx
        .build(&inputs, &partial, 4)
        .snapshot
        .expect("readiness changed");
    assert!(s.serves("east") && !s.complete());
}

/// Builds the clusterset of `east` and `west` (sources `kube=east` and
/// `kube=west`), with the exports of the `dropped` clusters left out.
fn build_two(
    idx: &mut Index,
    east: &SourceState,
    west: &SourceState,
    dropped: &[&str],
    at: i64,
) -> Build {
    let inputs = [
        Input {
            name: "kube=east",
            cluster: "east",
            state: east,
        },
        Input {
            name: "kube=west",
            cluster: "west",
            state: west,
        },
    ];
    let mut serving = Serving::all(&inputs);
    serving.dropped = dropped.iter().map(|c| (*c).to_owned()).collect();
    idx.build(&inputs, &serving, at)
}

/// `b` patched the last build into `snap`, and a fresh index's full
/// build of the same inputs makes the same: resources (the imports with
/// their endpoints and ClusterSet IPs), clusterset issues, invalid
/// objects, `/status` lines and exported names.
fn assert_patched_as_fresh(
    b: &Build,
    snap: &Snapshot,
    east: &SourceState,
    west: &SourceState,
    dropped: &[&str],
) {
    assert!(b.patched, "patched");
    let fresh = build_two(&mut index(), east, west, dropped, 0);
    assert!(!fresh.patched);
    let fresh_snap = fresh.snapshot.expect("a first snapshot");
    assert_eq!(versions(snap), versions(&fresh_snap));
    for (name, r) in &fresh_snap.resources {
        assert_eq!(**r, *snap.resources[name], "{name}");
    }
    assert_eq!(b.issues, fresh.issues);
    assert_eq!(b.imports, fresh.imports);
    assert_eq!(b.invalid, fresh.invalid);
    assert_eq!(b.services, fresh.services);
    assert_eq!(snap.exported, fresh_snap.exported);
}

/// The import `clusterset/ns/<service>` of `snap`: its ClusterSet IPs
/// and each slice's cluster with its endpoints' addresses.
fn import_of(snap: &Snapshot, service: &str) -> (Vec<IpAddr>, Vec<(String, Vec<IpAddr>)>) {
    let name = format!("clusterset/ns/{service}");
    let state = switchyard_proto::convert::decode_state_bytes(
        &name,
        &snap.resources[name.as_str()].service_state,
    )
    .expect("an import");
    let mut slices: Vec<(String, Vec<IpAddr>)> = state
        .slices
        .iter()
        .map(|s| {
            let addresses = s.endpoints.iter().flat_map(|e| e.addresses.iter().copied());
            (s.cluster.clone().unwrap_or_default(), addresses.collect())
        })
        .collect();
    slices.sort();
    (state.service.cluster_ips, slices)
}

/// The key of `cluster`'s one slice of Service `s0`, as [`exporting`] makes it.
fn exported_slice(cluster: &str) -> crate::source::SliceKey {
    (ServiceKey::new(cluster, "ns", "s0"), "s0-1".to_owned())
}

fn set_endpoint(state: &mut SourceState, cluster: &str, addresses: &[&str]) {
    state.slices.modify(&exported_slice(cluster), |s| {
        s.slice.endpoints[0].addresses = addresses.iter().map(|a| a.parse().expect("ip")).collect();
    });
}

#[test]
fn an_endpoint_change_of_an_exported_service_patches_its_import() {
    let mut idx = index();
    let mut east = exporting("east", "10.1.0.1", 20);
    let mut west = exporting("west", "10.2.0.1", 10);
    // Issues: east's session affinity disagrees with the older export
    // (west's), and east exports a Service it does not have.
    east.services
        .modify(&ServiceKey::new("east", "ns", "s0"), |s| {
            s.session_affinity_timeout = Some(60);
        });
    east.exports.push(crate::source::Export {
        key: ServiceKey::new("east", "ns", "ghost"),
        created_unix: Some(5),
        exported: Default::default(),
    });
    // A second exported Service, whose import must not move.
    let other = exporting("west", "10.2.0.9", 10);
    let svc = other.services.first().expect("a Service");
    let slice = other.slices.first().expect("a slice");
    let key = ServiceKey::new("west", "ns", "s1");
    west.services.push(Arc::new(Service {
        key: key.clone(),
        ..(**svc).clone()
    }));
    west.slices.push(Arc::new(SourceSlice {
        service: key.clone(),
        ..(**slice).clone()
    }));
    west.exports.push(crate::source::Export {
        key,
        created_unix: Some(10),
        exported: Default::default(),
    });
    let first = build_two(&mut idx, &east, &west, &[], 1);
    assert!(!first.patched);
    let reasons: Vec<(&str, &str)> = first
        .issues
        .iter()
        .map(|i| (i.cluster.as_str(), i.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("east", merge::NO_SERVICE),
            ("west", merge::SESSION_AFFINITY_CONFLICT),
            ("east", merge::SESSION_AFFINITY_CONFLICT)
        ]
    );
    let first = first.snapshot.expect("a first snapshot");
    let (ip, _) = import_of(&first, "s0");
    assert_eq!(ip.len(), 1);

    // East's endpoint moves: patched into east's Service and the import.
    set_endpoint(&mut east, "east", &["10.1.0.7"]);
    let b = build_two(&mut idx, &east, &west, &[], 2);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    let ep = |a: &str| a.parse::<IpAddr>().expect("ip");
    assert_eq!(
        import_of(&snap, "s0"),
        (
            ip.clone(),
            vec![
                ("east".to_owned(), vec![ep("10.1.0.7")]),
                ("west".to_owned(), vec![ep("10.2.0.1")]),
            ]
        )
    );
    assert_eq!(b.issues.len(), 3, "{:?}", b.issues);
    assert!(Arc::ptr_eq(
        &snap.resources["clusterset/ns/s1"],
        &first.resources["clusterset/ns/s1"]
    ));
    let delta = snap.delta_from(&first, &View::Agent("east".into()));
    let mut changed: Vec<&str> = delta.changed.iter().map(|r| r.name.as_str()).collect();
    changed.sort_unstable();
    assert_eq!(changed, ["clusterset/ns/s0", "east/ns/s0"]);

    // West's (the oldest export's) too.
    set_endpoint(&mut west, "west", &["10.2.0.8", "10.2.0.9"]);
    let b = build_two(&mut idx, &east, &west, &[], 3);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    assert_eq!(import_of(&snap, "s0").1[1].1.len(), 2);
    assert_eq!(import_of(&snap, "s0").0, ip);

    // East's Service made invalid: its disagreement goes with it, the
    // merge's issue stays; and both come back with it.
    set_endpoint(&mut east, "east", &[]);
    let b = build_two(&mut idx, &east, &west, &[], 4);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    let reasons: Vec<&str> = b.issues.iter().map(|i| i.reason).collect();
    assert_eq!(reasons, [merge::NO_SERVICE]);
    set_endpoint(&mut east, "east", &["10.1.0.1"]);
    let b = build_two(&mut idx, &east, &west, &[], 5);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    let reasons: Vec<&str> = b.issues.iter().map(|i| i.reason).collect();
    assert_eq!(
        reasons,
        [
            merge::NO_SERVICE,
            merge::SESSION_AFFINITY_CONFLICT,
            merge::SESSION_AFFINITY_CONFLICT
        ]
    );
}

/// With more imports than ClusterSet IPs, an import that leaves frees
/// an address another one was waiting for: the patch cannot tell that
/// one's resource, so the full build runs. Once the ServiceImports
/// record it, the one that comes back waits, patched, with the issue a
/// full build reports; without the record, the set of imports decides.
#[test]
fn an_import_waiting_for_a_clusterset_ip_takes_the_full_build() {
    let mut config = IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr"));
    // Five addresses (offsets 2 to 6) for six imports.
    config.clusterset_cidrs = vec!["10.112.0.0/29".parse().expect("cidr")];
    let mut idx = Index::new(&config);
    let mut state = source(6);
    state.exports = state
        .services
        .iter()
        .map(|s| crate::source::Export {
            key: s.key.clone(),
            created_unix: Some(1),
            exported: Default::default(),
        })
        .collect();
    let waiting = |b: &Build| -> Vec<String> {
        b.issues
            .iter()
            .filter(|i| i.reason == merge::NO_CLUSTERSET_IP)
            .map(|i| i.service.clone())
            .collect()
    };
    let first = build(&mut idx, &[("t", &state)], 1);
    let [waits] = waiting(&first)
        .try_into()
        .expect("one import without an address");
    let waits = waits.strip_prefix("ns/").expect("ns/").to_owned();
    let snap = first.snapshot.expect("a first snapshot");
    assert!(
        !snap
            .resources
            .contains_key(format!("clusterset/ns/{waits}").as_str())
    );
    let leaves = if waits == "s0" { 1 } else { 0 };

    state.slices.modify(&slice_key(leaves), |s| {
        s.slice.endpoints[0].addresses.clear()
    });
    let b = build(&mut idx, &[("t", &state)], 2);
    assert!(!b.patched, "another import's address moved: a full build");
    assert!(waiting(&b).is_empty(), "{:?}", b.issues);
    let snap = b.snapshot.expect("a change");
    assert!(
        snap.resources
            .contains_key(format!("clusterset/ns/{waits}").as_str())
    );
    assert!(
        !snap
            .resources
            .contains_key(format!("clusterset/ns/s{leaves}").as_str())
    );

    let back = |state: &mut SourceState| {
        state.slices.modify(&slice_key(leaves), |s| {
            s.slice.endpoints[0].addresses =
                vec![format!("10.244.0.{}", leaves + 1).parse().expect("ip")].into();
        });
    };
    // Without a record: the same six imports, the same answer as the
    // first build, whatever happened in between.
    let mut unrecorded = state.clone();
    back(&mut unrecorded);
    let mut replica = Index::new(&config);
    build(&mut replica, &[("t", &state)], 2);
    let b = build(&mut replica, &[("t", &unrecorded)], 3);
    assert_eq!(waiting(&b), [format!("ns/{waits}")]);

    // The writer records the addresses in the ServiceImports.
    state.service_imports = recorded(&snap);
    let b = build(&mut idx, &[("t", &state)], 3);
    assert!(!b.patched, "the record changed: a full build");
    assert!(b.snapshot.is_none(), "the record is what was served");
    back(&mut state);
    let b = build(&mut idx, &[("t", &state)], 4);
    assert!(b.patched, "the one that came back waits: patched");
    assert_eq!(waiting(&b), [format!("ns/s{leaves}")]);
    let snap = b.snapshot.expect("a change");
    assert!(
        snap.resources
            .contains_key(format!("default/ns/s{leaves}").as_str())
    );
    assert!(
        !snap
            .resources
            .contains_key(format!("clusterset/ns/s{leaves}").as_str())
    );
    assert!(
        snap.resources
            .contains_key(format!("clusterset/ns/{waits}").as_str())
    );
    assert_eq!(
        snap.resources
            .keys()
            .filter(|n| n.starts_with("clusterset/"))
            .count(),
        5
    );
    // A replica that starts now reads the record and agrees.
    let fresh = build(&mut Index::new(&config), &[("t", &state)], 4);
    assert_eq!(
        versions(&fresh.snapshot.expect("a first snapshot")),
        versions(&snap)
    );
}

/// The cluster IPs of every Service of `snap`, by name.
fn cluster_ips(snap: &Snapshot) -> BTreeMap<String, Vec<IpAddr>> {
    snap.resources
        .iter()
        .map(|(n, r)| {
            let state = switchyard_proto::convert::decode_state_bytes(n, &r.service_state)
                .expect("decodes");
            (n.to_string(), state.service.cluster_ips)
        })
        .collect()
}

#[test]
fn cluster_ips_are_a_function_of_the_services_not_of_what_an_index_saw() {
    let all = source(60);
    let mut fewer = all.clone();
    for i in 40..60 {
        fewer
            .services
            .remove(&ServiceKey::new("default", "ns", format!("s{i}")));
    }
    let mut other = all.clone();
    for i in (0..60).step_by(3) {
        other
            .services
            .remove(&ServiceKey::new("default", "ns", format!("s{i}")));
    }
    // One index sees 40 Services, then 60, then every third one goes;
    // another starts with the last set.
    let mut seen = index();
    let first = cluster_ips(
        &build(&mut seen, &[("t", &fewer)], 1)
            .snapshot
            .expect("a snapshot"),
    );
    let grown = cluster_ips(
        &build(&mut seen, &[("t", &all)], 2)
            .snapshot
            .expect("a change"),
    );
    let last = cluster_ips(
        &build(&mut seen, &[("t", &other)], 3)
            .snapshot
            .expect("a change"),
    );
    let fresh = cluster_ips(
        &build(&mut index(), &[("t", &other)], 3)
            .snapshot
            .expect("a snapshot"),
    );
    assert_eq!(last, fresh, "two replicas agree whatever they saw before");
    // And here nobody moved while others came and went (no two of these
    // names hash onto neighbouring addresses of the /16).
    for (name, ips) in &first {
        assert_eq!(grown.get(name), Some(ips), "{name}");
        assert_eq!(ips.len(), 1);
    }
    for (name, ips) in &last {
        assert_eq!(grown.get(name), Some(ips), "{name}");
    }
}

/// `source(n)` with Service `s{i}` asking for `families` under `policy`.
fn asking(
    state: &mut SourceState,
    i: usize,
    families: &[IpFamily],
    policy: Option<switchyard_model::IpFamilyPolicy>,
) {
    state
        .services
        .modify(&ServiceKey::new("default", "ns", format!("s{i}")), |s| {
            s.requested_ip_families = families.to_vec();
            s.ip_family_policy = policy;
        });
}

#[test]
fn each_service_gets_an_address_of_each_family_it_asks_for() {
    use IpFamily::{V4, V6};
    use switchyard_model::IpFamilyPolicy::{PreferDualStack, RequireDualStack, SingleStack};
    let mut state = source(5);
    asking(&mut state, 1, &[V6], Some(SingleStack));
    asking(&mut state, 2, &[], Some(PreferDualStack));
    asking(&mut state, 3, &[V6, V4], Some(RequireDualStack));
    asking(&mut state, 4, &[V6], None);
    let v4: IpNet = "10.96.0.0/16".parse().expect("cidr");
    let v6: IpNet = "fd00:96::/112".parse().expect("cidr");
    let mut config = IndexConfig::in_memory(v4);
    config.service_cidrs = vec![v4, v6];
    let b = build(&mut Index::new(&config), &[("t", &state)], 1);
    assert!(b.invalid.is_empty(), "{:?}", b.invalid);
    let ips = cluster_ips(&b.snapshot.expect("a snapshot"));
    let families = |i: usize| -> Vec<IpFamily> {
        let ips = &ips[&format!("default/ns/s{i}")];
        for ip in ips {
            assert!(v4.contains(ip) || v6.contains(ip), "{ip}");
        }
        ips.iter().map(IpFamily::of).collect()
    };
    assert_eq!(families(0), [V4], "the default: the first range's family");
    assert_eq!(families(1), [V6]);
    assert_eq!(families(2), [V4, V6]);
    assert_eq!(families(3), [V6, V4]);
    assert_eq!(families(4), [V6]);

    // On an IPv4-only control plane: PreferDualStack is IPv4, the rest
    // are refused with the field at fault.
    let b = build(&mut index(), &[("t", &state)], 1);
    let refused: Vec<(&str, &str)> = b
        .invalid
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            ("Service ns/s1", "spec.ipFamilies[0]"),
            ("Service ns/s3", "spec.ipFamilies[0]"),
            ("Service ns/s4", "spec.ipFamilies[0]"),
        ]
    );
    assert!(
        b.invalid[0]
            .message
            .contains("--service-cidr has no IPv6 range")
    );
    asking(&mut state, 3, &[V4, V6], Some(RequireDualStack));
    let b = build(&mut index(), &[("t", &state)], 1);
    assert!(
        b.invalid
            .iter()
            .any(|e| e.object == "Service ns/s3" && e.field == "spec.ipFamilies[1]"),
        "{:?}",
        b.invalid
    );
    let ips = cluster_ips(&b.snapshot.expect("a snapshot"));
    assert_eq!(
        ips["default/ns/s2"].len(),
        1,
        "PreferDualStack on IPv4 only"
    );
}

/// `exporting(..)` with the Service's cluster IPs set to `ips`.
fn exporting_with(cluster: &str, created: i64, ips: &[&str]) -> SourceState {
    let mut st = exporting(cluster, "10.1.0.1", created);
    st.services
        .modify(&ServiceKey::new(cluster, "ns", "s0"), |s| {
            s.cluster_ips = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
        });
    st
}

#[test]
fn an_import_gets_a_clusterset_ip_of_each_family_its_exports_have() {
    use IpFamily::{V4, V6};
    let v4: IpNet = "10.112.0.0/16".parse().expect("cidr");
    let v6: IpNet = "fd00:112::/112".parse().expect("cidr");
    let mut dual = IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr"));
    dual.clusterset_cidrs = vec![v4, v6];
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [IpFamily]);
    let cases: [Case<'_>; 4] = [
        ("IPv6 only", &["fd00:96::5"], &["fd00:96::6"], &[V6]),
        (
            "dual-stack",
            &["10.96.0.5", "fd00:96::5"],
            &["10.96.0.6", "fd00:96::6"],
            &[V4, V6],
        ),
        (
            "IPv6 primary",
            &["fd00:96::5", "10.96.0.5"],
            &["10.96.0.6", "fd00:96::6"],
            &[V6, V4],
        ),
        (
            "narrowed",
            &["10.96.0.5", "fd00:96::5"],
            &["10.96.0.6"],
            &[V4],
        ),
    ];
    for (what, west_ips, east_ips, want) in cases {
        let west = exporting_with("west", 10, west_ips);
        let east = exporting_with("east", 20, east_ips);
        let b = build_two(&mut Index::new(&dual), &east, &west, &[], 1);
        assert!(b.issues.is_empty(), "{what}: {:?}", b.issues);
        let (ips, _) = import_of(&b.snapshot.expect("a snapshot"), "s0");
        let families: Vec<IpFamily> = ips.iter().map(IpFamily::of).collect();
        assert_eq!(families, want, "{what}");
        assert!(
            ips.iter().all(|ip| v4.contains(ip) || v6.contains(ip)),
            "{what}"
        );
    }
    // An IPv6-only import on a control plane with an IPv4 clusterset
    // range only: no ClusterSet IP, said.
    let west = exporting_with("west", 10, &["fd00:96::5"]);
    let east = exporting_with("east", 20, &["fd00:96::6"]);
    let b = build_two(&mut index(), &east, &west, &[], 1);
    let snap = b.snapshot.expect("a snapshot");
    assert!(!snap.resources.contains_key("clusterset/ns/s0"));
    assert_eq!(b.issues.len(), 1, "{:?}", b.issues);
    assert_eq!(b.issues[0].reason, merge::NO_CLUSTERSET_IP);
    assert!(
        b.issues[0].message.contains("no --clusterset-cidr of IPv6"),
        "{:?}",
        b.issues
    );
}

#[test]
fn the_serviceimports_record_is_kept_and_clusters_that_disagree_are_named() {
    use crate::source::RecordedImport;
    let record = |ips: &[&str], ours: bool| RecordedImport {
        namespace: "ns".into(),
        name: "s0".into(),
        ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
        ours,
    };
    let mut east = exporting("east", "10.1.0.1", 20);
    let mut west = exporting("west", "10.2.0.1", 10);
    let bare = build_two(&mut index(), &east, &west, &[], 1);
    let (allocated, _) = import_of(&bare.snapshot.expect("a snapshot"), "s0");
    // Another manager's ServiceImport and an address outside the range
    // are not the record.
    east.service_imports = vec![record(&["10.112.0.77"], false)];
    west.service_imports = vec![record(&["192.0.2.1"], true)];
    let b = build_two(&mut index(), &east, &west, &[], 1);
    assert_eq!(
        import_of(&b.snapshot.expect("a snapshot"), "s0").0,
        allocated
    );
    assert!(b.issues.is_empty(), "{:?}", b.issues);
    // One cluster's record is kept.
    west.service_imports = vec![record(&["10.112.0.9"], true)];
    east.service_imports = Vec::new();
    let b = build_two(&mut index(), &east, &west, &[], 1);
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert_eq!(
        import_of(&b.snapshot.expect("a snapshot"), "s0").0,
        [ip("10.112.0.9")]
    );
    // Two clusters disagree: a tie goes to the lowest cluster id, and
    // the other is named.
    east.service_imports = vec![record(&["10.112.0.5"], true)];
    let mut idx = index();
    let b = build_two(&mut idx, &east, &west, &[], 1);
    assert_eq!(
        import_of(&b.snapshot.expect("a snapshot"), "s0").0,
        [ip("10.112.0.5")]
    );
    let issues: Vec<(&str, &str)> = b
        .issues
        .iter()
        .map(|i| (i.cluster.as_str(), i.reason))
        .collect();
    assert_eq!(issues, [("west", merge::RECORD_MISMATCH)]);
    assert!(
        b.issues[0].message.contains("records 10.112.0.9"),
        "{:?}",
        b.issues
    );
    // The writer rewrites west's: the issue goes, the address stays.
    west.service_imports = vec![record(&["10.112.0.5"], true)];
    let b = build_two(&mut idx, &east, &west, &[], 2);
    assert!(b.issues.is_empty(), "{:?}", b.issues);
    assert!(b.snapshot.is_none(), "nothing served changed");
}

#[test]
fn a_build_says_what_each_serviceimport_carries() {
    let mut east = exporting("east", "10.1.0.1", 20);
    let mut west = exporting("west", "10.2.0.1", 10);
    west.exports[0]
        .exported
        .labels
        .insert("tier".into(), "web".into());
    east.exports[0]
        .exported
        .labels
        .insert("tier".into(), "api".into());
    east.exports[0]
        .exported
        .annotations
        .insert("note".into(), "east".into());
    let b = build_two(&mut index(), &east, &west, &[], 1);
    let meta = &b.imports[&("ns".to_owned(), "s0".to_owned())];
    assert_eq!(meta.clusters, ["west", "east"]);
    assert_eq!(
        meta.exported, west.exports[0].exported,
        "the oldest export's"
    );
    let reasons: Vec<(&str, &str)> = b
        .issues
        .iter()
        .map(|i| (i.cluster.as_str(), i.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("west", merge::LABELS_CONFLICT),
            ("west", merge::ANNOTATIONS_CONFLICT),
            ("east", merge::LABELS_CONFLICT),
            ("east", merge::ANNOTATIONS_CONFLICT),
        ]
    );
}

/// The ServiceImports a writer would leave for the imports of `snap`.
fn recorded(snap: &Snapshot) -> Vec<crate::source::RecordedImport> {
    snap.resources
        .iter()
        .filter(|(n, _)| n.starts_with("clusterset/"))
        .map(|(n, r)| {
            let state = switchyard_proto::convert::decode_state_bytes(n, &r.service_state)
                .expect("an import");
            crate::source::RecordedImport {
                namespace: state.service.key.namespace,
                name: state.service.key.name,
                ips: state.service.cluster_ips,
                ours: true,
            }
        })
        .collect()
}

#[test]
fn an_exported_service_made_invalid_by_its_endpoints_changes_its_import_as_a_full_build_would() {
    let mut idx = index();
    let mut east = exporting("east", "10.1.0.1", 20);
    let mut west = exporting("west", "10.2.0.1", 10);
    let first = build_two(&mut idx, &east, &west, &[], 1)
        .snapshot
        .expect("a first snapshot");
    let (ip, _) = import_of(&first, "s0");
    assert!(first.exported.contains("east/ns/s0"));

    // An endpoint without addresses: east's Service leaves, and with it
    // east's endpoints from the import and its name from the exported.
    set_endpoint(&mut east, "east", &[]);
    let b = build_two(&mut idx, &east, &west, &[], 2);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    assert!(!snap.resources.contains_key("east/ns/s0"));
    assert!(!snap.exported.contains("east/ns/s0"));
    assert_eq!(b.invalid.len(), 1, "{:?}", b.invalid);
    let (now, slices) = import_of(&snap, "s0");
    assert_eq!(now, ip);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].0, "west");

    // West's too: no exporter is valid, the import leaves.
    set_endpoint(&mut west, "west", &[]);
    let b = build_two(&mut idx, &east, &west, &[], 3);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    assert!(!snap.resources.contains_key("clusterset/ns/s0"));
    assert!(b.services.values().all(|s| s.cluster != CLUSTERSET));
    assert!(snap.exported.is_empty());

    // Both come back, and so does the import, with its ClusterSet IP.
    set_endpoint(&mut west, "west", &["10.2.0.1"]);
    let b = build_two(&mut idx, &east, &west, &[], 4);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    assert_eq!(import_of(&snap, "s0").0, ip);
    set_endpoint(&mut east, "east", &["10.1.0.1"]);
    let b = build_two(&mut idx, &east, &west, &[], 5);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
    assert_eq!(versions(&snap), versions(&first));
}

#[test]
fn an_endpoint_change_beside_a_dropped_cluster_patches_the_import_without_it() {
    let mut idx = index();
    let mut east = exporting("east", "10.1.0.1", 20);
    let mut west = exporting("west", "10.2.0.1", 10);
    let first = build_two(&mut idx, &east, &west, &["east"], 1)
        .snapshot
        .expect("a first snapshot");
    let (ip, _) = import_of(&first, "s0");

    // West's endpoint moves: the import has it, and still not east's.
    set_endpoint(&mut west, "west", &["10.2.0.5"]);
    let b = build_two(&mut idx, &east, &west, &["east"], 2);
    let snap = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &snap, &east, &west, &["east"]);
    let ep: IpAddr = "10.2.0.5".parse().expect("ip");
    assert_eq!(
        import_of(&snap, "s0"),
        (ip, vec![("west".to_owned(), vec![ep])])
    );

    // East's moves: east's own view changes, the import does not.
    set_endpoint(&mut east, "east", &["10.1.0.5"]);
    let b = build_two(&mut idx, &east, &west, &["east"], 3);
    let next = b.snapshot.clone().expect("a change");
    assert_patched_as_fresh(&b, &next, &east, &west, &["east"]);
    assert!(Arc::ptr_eq(
        &next.resources["clusterset/ns/s0"],
        &snap.resources["clusterset/ns/s0"]
    ));
}

#[test]
fn an_equal_object_in_a_new_arc_keeps_the_version() {
    let mut idx = index();
    let state = source(3);
    let first = build(&mut idx, &[("t", &state)], 1)
        .snapshot
        .expect("first snapshot");
    let copy = SourceState {
        services: state
            .services
            .iter()
            .map(|s| Arc::new((**s).clone()))
            .collect(),
        slices: state
            .slices
            .iter()
            .map(|s| Arc::new((**s).clone()))
            .collect(),
        ..state.clone()
    };
    assert!(build(&mut idx, &[("t", &copy)], 2).snapshot.is_none());
    assert_eq!(idx.current.version, first.version);
}
