//! The API server stand-in, spoken to by the unmodified kube client: what
//! the kube source relies on must behave as a real API server's does.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig};
use switchyard_integration_tests::{init_logging, within};

async fn client(api: &FakeApiServer) -> Client {
    let config = Config::new(api.url().parse().expect("url"));
    Client::try_from(config).expect("client")
}

fn svc(name: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"ports": [{"port": port}]},
    }))
    .expect("service")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_conflicts_and_errors_are_the_apis() {
    init_logging();
    let api = FakeApiServer::start_local().await.expect("start");
    let services: Api<Service> = Api::namespaced(client(&api).await, "shop");
    let pp = PostParams::default();

    let created = services.create(&pp, &svc("web", 80)).await.expect("create");
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("shop"));
    let err = services
        .create(&pp, &svc("web", 80))
        .await
        .expect_err("exists");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));

    // A stale resourceVersion on replace is a 409 Conflict.
    let mut stale = created.clone();
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [{"port": 81}]}})),
        )
        .await
        .expect("merge patch");
    stale
        .spec
        .as_mut()
        .expect("spec")
        .ports
        .as_mut()
        .expect("ports")[0]
        .port = 82;
    let err = services
        .replace("web", &pp, &stale)
        .await
        .expect_err("stale");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"));

    let patched = services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "replace", "path": "/spec/ports/0/port", "value": 83}]),
                )
                .expect("json patch"),
            ),
        )
        .await
        .expect("json patch");
    assert_eq!(
        patched.spec.expect("spec").ports.expect("ports")[0].port,
        83
    );
    assert_eq!(patched.metadata.generation, Some(3));

    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    let err = services.get("web").await.expect_err("gone");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_and_watches_replay_resume_and_expire() {
    init_logging();
    let api = FakeApiServer::start_local().await.expect("start");
    for i in 0..7 {
        let mut s = serde_json::to_value(svc(&format!("s{i}"), 80)).expect("json");
        s["metadata"]["namespace"] = json!("shop");
        api.store().create(Kind::Service, s).expect("create");
    }
    let services: Api<Service> = Api::all(client(&api).await);

    // Pages of 3, one resourceVersion for the whole list.
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let mut rvs = Vec::new();
    loop {
        let page = services.list(&lp).await.expect("page");
        names.extend(
            page.items
                .iter()
                .map(|s| s.metadata.name.clone().expect("name")),
        );
        rvs.push(page.metadata.resource_version.clone().expect("rv"));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    assert_eq!(rvs.len(), 3);
    assert!(rvs.iter().all(|rv| *rv == rvs[0]));
    let selected = services
        .list(&ListParams::default().labels("app in (s1,s2)"))
        .await
        .expect("selected");
    assert_eq!(selected.items.len(), 2);

    // Watch from the list's resourceVersion: later changes, nothing older.
    let rv = rvs[0].clone();
    let mut stream = services
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    api.store()
        .delete(&(Kind::Service, "shop".into(), "s3".into()))
        .expect("delete");
    match within("a DELETED event", stream.try_next())
        .await
        .expect("event")
    {
        Some(WatchEvent::Deleted(s)) => assert_eq!(s.metadata.name.as_deref(), Some("s3")),
        other => panic!("expected DELETED, got {other:?}"),
    }
    // Resuming from an old resourceVersion replays what happened since.
    let mut replay = services
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    assert!(matches!(
        within("a replayed DELETED", replay.try_next())
            .await
            .expect("event"),
        Some(WatchEvent::Deleted(_))
    ));
    // After compaction the same resourceVersion is gone: one ERROR 410 event.
    api.compact();
    let mut expired = services
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch stream opens with HTTP 200")
        .boxed();
    match within("an ERROR event", expired.try_next())
        .await
        .expect("event")
    {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    // An expired continue token is a 410 too.
    let page = services
        .list(&ListParams::default().limit(2))
        .await
        .expect("page");
    api.store()
        .create(
            Kind::Service,
            json!({"metadata": {"name": "x", "namespace": "shop"}}),
        )
        .expect("create");
    api.compact();
    let err = services
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().expect("continue")),
        )
        .await
        .expect_err("expired");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 410));

    // Bookmarks arrive when allowed.
    let rv = api.store().resource_version().to_string();
    let mut bookmarks = services
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            },
            &rv,
        )
        .await
        .expect("watch")
        .boxed();
    assert!(matches!(
        within("a BOOKMARK", bookmarks.try_next()).await.expect("event"),
        Some(WatchEvent::Bookmark(b)) if b.metadata.resource_version == rv
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_watcher_streams_its_initial_list() {
    init_logging();
    let api = FakeApiServer::start_local().await.expect("start");
    for i in 0..3 {
        api.store()
            .create(
                Kind::EndpointSlice,
                json!({"metadata": {"name": format!("e{i}"), "namespace": "shop"}, "addressType": "IPv4", "endpoints": []}),
            )
            .expect("create");
    }
    let slices: Api<EndpointSlice> = Api::all(client(&api).await);
    // sendInitialEvents=true: ADDED for each object, then the BOOKMARK
    // annotated k8s.io/initial-events-end that the watcher turns into InitDone.
    let mut events = watcher(slices, watcher::Config::default().streaming_lists()).boxed();
    let mut applied = 0;
    loop {
        match within("watcher events", events.try_next())
            .await
            .expect("event")
        {
            Some(watcher::Event::Init) => {}
            Some(watcher::Event::InitApply(_)) => applied += 1,
            Some(watcher::Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(applied, 3);
}

/// The MCS API's kinds as the kube client addresses them, in `version`.
fn mcs(client: &Client, kind: &str, version: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", version, kind);
    Api::namespaced_with(client.clone(), "shop", &ApiResource::from_gvk(&gvk))
}

fn dynamic(kind: &str, name: &str, body: serde_json::Value) -> DynamicObject {
    let mut obj = json!({
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop"},
    });
    if let (Some(o), Some(b)) = (obj.as_object_mut(), body.as_object()) {
        o.extend(b.clone());
    }
    serde_json::from_value(obj).expect("dynamic object")
}

fn field<'a>(obj: &'a DynamicObject, pointer: &str) -> Option<&'a serde_json::Value> {
    obj.data.pointer(pointer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_kinds_are_served_in_two_versions_with_a_status_subresource() {
    init_logging();
    let api = FakeApiServer::start_local().await.expect("start");
    let c = client(&api).await;

    // Discovery: both versions, v1beta1 preferred, status subresources listed.
    let group: serde_json::Value = c
        .request(
            http::Request::get("/apis/multicluster.x-k8s.io")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("group discovery");
    assert_eq!(
        group["preferredVersion"]["version"], "v1beta1",
        "group document: {group}"
    );
    let versions: Vec<&str> = group["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(versions, ["v1beta1", "v1alpha1"]);
    let resources: serde_json::Value = c
        .request(
            http::Request::get("/apis/multicluster.x-k8s.io/v1alpha1")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("resource list");
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for n in [
        "serviceexports",
        "serviceexports/status",
        "serviceimports",
        "serviceimports/status",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }

    // Written in v1alpha1, read in v1beta1: the same object.
    let old = mcs(&c, "ServiceExport", "v1alpha1");
    let new = mcs(&c, "ServiceExport", "v1beta1");
    let mut export = dynamic(
        "ServiceExport",
        "web",
        json!({"status": {"conditions": [{"type": "Valid", "status": "True"}]}}),
    );
    export.types.as_mut().expect("types").api_version = "multicluster.x-k8s.io/v1alpha1".into();
    let created = old
        .create(&PostParams::default(), &export)
        .await
        .expect("create v1alpha1");
    assert_eq!(
        created.types.as_ref().map(|t| t.api_version.as_str()),
        Some("multicluster.x-k8s.io/v1alpha1")
    );
    // A create sets no status: that is the status subresource's.
    assert_eq!(field(&created, "/status"), None, "{created:?}");
    let read = new.get("web").await.expect("get v1beta1");
    assert_eq!(
        read.types.as_ref().map(|t| t.api_version.as_str()),
        Some("multicluster.x-k8s.io/v1beta1")
    );
    assert_eq!(read.metadata.uid, created.metadata.uid);

    // The status subresource writes status only, without a new generation;
    // the main resource cannot write status.
    let valid = json!({"status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Exported"}]},
                       "metadata": {"labels": {"ignored": "yes"}}});
    let after = new
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&valid))
        .await
        .expect("patch status");
    assert_eq!(
        field(&after, "/status/conditions/0/reason"),
        Some(&json!("Exported"))
    );
    assert_eq!(after.metadata.labels, None, "a status write changed labels");
    assert_eq!(after.metadata.generation, Some(1));
    assert_ne!(
        after.metadata.resource_version,
        read.metadata.resource_version
    );
    let main = new
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": []}, "metadata": {"labels": {"a": "b"}}}),
            ),
        )
        .await
        .expect("patch main");
    assert_eq!(
        field(&main, "/status/conditions/0/type"),
        Some(&json!("Valid")),
        "a main-resource write changed status"
    );
    assert_eq!(
        main.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("a"))
            .map(String::as_str),
        Some("b")
    );
    // The status of an object that does not exist: 404.
    let err = new
        .patch_status("nope", &PatchParams::default(), &Patch::Merge(&valid))
        .await
        .expect_err("no such object");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
    // Watching in either version sees the object in that version.
    let mut events = watcher(old.clone(), watcher::Config::default()).boxed();
    loop {
        match within("a v1alpha1 watch event", events.try_next())
            .await
            .expect("event")
        {
            Some(watcher::Event::InitApply(o)) => {
                assert_eq!(
                    o.types.as_ref().map(|t| t.api_version.as_str()),
                    Some("multicluster.x-k8s.io/v1alpha1")
                );
                break;
            }
            Some(_) => {}
            None => panic!("the watch ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1alpha1_only_cluster_does_not_serve_v1beta1() {
    init_logging();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = FakeApiServer::start(
        listener,
        ServerConfig {
            mcs_v1beta1: false,
            ..ServerConfig::default()
        },
    )
    .expect("start");
    let c = client(&api).await;
    let err = mcs(&c, "ServiceExport", "v1beta1")
        .list(&ListParams::default())
        .await
        .expect_err("v1beta1 is not served");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
    mcs(&c, "ServiceExport", "v1alpha1")
        .create(&PostParams::default(), &{
            let mut e = dynamic("ServiceExport", "web", json!({}));
            e.types.as_mut().expect("types").api_version = "multicluster.x-k8s.io/v1alpha1".into();
            e
        })
        .await
        .expect("v1alpha1 is");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_tracks_owners_and_refuses_conflicts() {
    init_logging();
    let api = FakeApiServer::start_local().await.expect("start");
    let c = client(&api).await;
    let imports = mcs(&c, "ServiceImport", "v1beta1");
    let ours = PatchParams::apply("switchyard");
    let import = |ips: &[&str], ports: serde_json::Value| {
        dynamic(
            "ServiceImport",
            "web",
            json!({"spec": {"type": "ClusterSetIP", "ips": ips, "ports": ports}}),
        )
    };

    // Apply creates, and records the manager.
    let created = imports
        .patch(
            "web",
            &ours,
            &Patch::Apply(import(
                &["10.9.0.1"],
                json!([{"port": 80, "protocol": "TCP"}]),
            )),
        )
        .await
        .expect("apply creates");
    let managed = created
        .metadata
        .managed_fields
        .clone()
        .expect("managedFields");
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("switchyard"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    assert_eq!(
        managed[0].api_version.as_deref(),
        Some("multicluster.x-k8s.io/v1beta1")
    );

    // The same apply again changes nothing: same resourceVersion.
    let again = imports
        .patch(
            "web",
            &ours,
            &Patch::Apply(import(
                &["10.9.0.1"],
                json!([{"port": 80, "protocol": "TCP"}]),
            )),
        )
        .await
        .expect("apply again");
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // Another manager setting the same value shares it; another value is
    // a 409 naming the owner, unless forced.
    let theirs = PatchParams::apply("someone-else");
    let same = dynamic(
        "ServiceImport",
        "web",
        json!({"spec": {"type": "ClusterSetIP"}}),
    );
    imports
        .patch("web", &theirs, &Patch::Apply(&same))
        .await
        .expect("same value: no conflict");
    let other = dynamic(
        "ServiceImport",
        "web",
        json!({"spec": {"type": "Headless"}}),
    );
    let err = imports
        .patch("web", &theirs, &Patch::Apply(&other))
        .await
        .expect_err("conflict");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert!(
                s.message.contains("switchyard") && s.message.contains(".spec.type"),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 409, got {other:?}"),
    }
    let forced = imports
        .patch("web", &theirs.clone().force(), &Patch::Apply(&other))
        .await
        .expect("forced");
    assert_eq!(field(&forced, "/spec/type"), Some(&json!("Headless")));
    // switchyard lost .spec.type: its next apply of it conflicts.
    let err = imports
        .patch(
            "web",
            &ours,
            &Patch::Apply(import(
                &["10.9.0.1"],
                json!([{"port": 80, "protocol": "TCP"}]),
            )),
        )
        .await
        .expect_err("switchyard no longer owns .spec.type");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));

    // A field the manager stops applying is removed when no one else owns
    // it; fields it never owned stay.
    let trimmed = imports
        .patch(
            "web",
            &ours,
            &Patch::Apply(dynamic(
                "ServiceImport",
                "web",
                json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}]}}),
            )),
        )
        .await
        .expect("apply without ips");
    assert_eq!(field(&trimmed, "/spec/ips"), None, "{:?}", trimmed.data);
    assert_eq!(field(&trimmed, "/spec/type"), Some(&json!("Headless")));

    // Status through the subresource, keyed by cluster: two managers own
    // one entry each.
    let cluster = |name: &str| {
        dynamic(
            "ServiceImport",
            "web",
            json!({"status": {"clusters": [{"cluster": name}]}}),
        )
    };
    imports
        .patch_status("web", &ours, &Patch::Apply(cluster("east")))
        .await
        .expect("status apply east");
    let both = imports
        .patch_status("web", &theirs, &Patch::Apply(cluster("west")))
        .await
        .expect("status apply west");
    let clusters: Vec<&str> = field(&both, "/status/clusters")
        .and_then(|c| c.as_array())
        .expect("clusters")
        .iter()
        .filter_map(|c| c["cluster"].as_str())
        .collect();
    assert_eq!(clusters, ["east", "west"]);
    let subresources: Vec<Option<String>> = both
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| m.subresource.clone())
        .collect();
    assert!(
        subresources.contains(&Some("status".into())),
        "{subresources:?}"
    );
    // A manager dropping its entry removes only that one.
    let east_only = imports
        .patch_status(
            "web",
            &theirs,
            &Patch::Apply(dynamic("ServiceImport", "web", json!({}))),
        )
        .await
        .expect("status apply nothing");
    let clusters: Vec<&str> = field(&east_only, "/status/clusters")
        .and_then(|c| c.as_array())
        .expect("clusters")
        .iter()
        .filter_map(|c| c["cluster"].as_str())
        .collect();
    assert_eq!(clusters, ["east"]);
}

/// Two stand-in programs started with different `--context` names write
/// kubeconfigs that merge as `KUBECONFIG=east:west` does (kube-rs reads
/// that variable file by file and merges them this way): each context of
/// the merged file reaches its own server, and the first file's context
/// stays the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_ins_named_apart_have_kubeconfigs_that_merge() {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use tokio::io::AsyncBufReadExt;

    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut programs = Vec::new();
    let mut files = Vec::new();
    for context in ["east", "west"] {
        // A Service named after the context tells the servers apart.
        let manifest = dir.path().join(format!("{context}.yaml"));
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web-{context}, namespace: shop}}\n\
                 spec: {{ports: [{{port: 80}}]}}\n"
            ),
        )
        .expect("manifest");
        let kubeconfig = dir.path().join(format!("{context}.kubeconfig"));
        let mut program = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake_apiserver"))
            .args(["--listen", "127.0.0.1:0", "--context", context])
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .arg("--load")
            .arg(&manifest)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("fake_apiserver starts");
        // It logs that it listens once the kubeconfig is written.
        let mut lines = tokio::io::BufReader::new(program.stdout.take().expect("stdout")).lines();
        within(&format!("the {context} stand-in to listen"), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if line.contains("API server stand-in listening") {
                    return;
                }
            }
            panic!("the {context} stand-in exited before it listened");
        })
        .await;
        programs.push((program, lines));
        files.push(kubeconfig);
    }

    let text = std::fs::read_to_string(&files[1]).expect("west kubeconfig");
    let west = Kubeconfig::read_from(&files[1]).expect("west parses");
    assert_eq!(west.current_context.as_deref(), Some("west"), "{text}");
    for names in [
        west.clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        west.auth_infos.iter().map(|u| u.name.as_str()).collect(),
        west.contexts.iter().map(|c| c.name.as_str()).collect(),
    ] {
        assert_eq!(
            names,
            ["west"],
            "every entry is named after --context: {text}"
        );
    }

    let merged = Kubeconfig::read_from(&files[0])
        .expect("east parses")
        .merge(west)
        .expect("the two merge");
    assert_eq!(merged.current_context.as_deref(), Some("east"));
    for context in ["east", "west"] {
        let options = KubeConfigOptions {
            context: Some(context.to_owned()),
            ..KubeConfigOptions::default()
        };
        let config = Config::from_custom_kubeconfig(merged.clone(), &options)
            .await
            .unwrap_or_else(|e| panic!("context {context} of the merged kubeconfig: {e}"));
        let services: Api<Service> = Api::all(Client::try_from(config).expect("client"));
        let names: Vec<String> = within(&format!("listing Services through {context}"), async {
            services.list(&ListParams::default()).await
        })
        .await
        .unwrap_or_else(|e| panic!("listing Services through context {context}: {e}"))
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
        assert_eq!(
            names,
            [format!("web-{context}")],
            "context {context} reaches its own stand-in"
        );
    }
    drop(programs);
}
