//! The API server stand-in, spoken to by the unmodified kube client: what
//! the kube source relies on must behave as a real API server's does.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind};
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
