//! The `file:PATH` source against real files and the real file watcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard_control_plane::source::debounce::Debounce;
use switchyard_control_plane::source::file::FileSource;
use switchyard_control_plane::source::{Source, SourceState};
use switchyard_model::{Protocol, ServiceKey, ServiceType};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any expected change may take to show up.
const PATIENCE: Duration = Duration::from_secs(10);

struct Running {
    states: watch::Receiver<SourceState>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    fn start(paths: Vec<PathBuf>, debounce: Duration) -> Self {
        Self::start_source(FileSource::new(
            paths,
            "default".into(),
            Debounce::quiet(debounce),
        ))
    }

    fn start_source(source: FileSource) -> Self {
        let source = Box::new(source);
        let (tx, states) = watch::channel(SourceState::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Self {
            states,
            shutdown,
            task,
        }
    }

    /// The first state for which `pred` holds, or a panic naming `what`.
    async fn wait_for(
        &mut self,
        what: &str,
        pred: impl FnMut(&SourceState) -> bool,
    ) -> SourceState {
        let seen = tokio::time::timeout(PATIENCE, self.states.wait_for(pred))
            .await
            .map(|r| r.map(|state| state.clone()));
        match seen {
            Ok(Ok(state)) => state,
            Ok(Err(_)) => panic!("the source stopped while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last state: {:#?}",
                *self.states.borrow()
            ),
        }
    }

    async fn synced(&mut self) -> SourceState {
        self.wait_for("the first full read", |s| s.synced).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the source stops on shutdown")
            .expect("the source does not panic");
    }
}

fn service_names(s: &SourceState) -> Vec<String> {
    let mut names: Vec<_> = s.services.iter().map(|s| s.key.to_string()).collect();
    names.sort();
    names
}

fn write(path: &Path, content: &str) {
    std::fs::write(path, content).expect("write manifest");
}

fn svc(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: {port}\n"
    )
}

const WEB_SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
  - addresses: [10.244.1.5]
    nodeName: node-a
ports:
  - name: http
    port: 8080
";

#[tokio::test]
async fn loads_multi_document_files_lists_and_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("web.yaml"),
        &format!(
            "{}---\n{WEB_SLICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ignored\n",
            svc("web", "10.96.0.10", 80)
        ),
    );
    std::fs::create_dir(dir.path().join("more")).expect("mkdir");
    write(
        &dir.path().join("more/list.yml"),
        "apiVersion: v1\nkind: List\nitems:\n\
         - apiVersion: v1\n  kind: Service\n  metadata:\n    name: api\n    namespace: shop\n\
         \x20   annotations: {switchyard.io/cluster: east}\n  spec:\n    ports: [{port: 443}]\n",
    );
    write(
        &dir.path().join("typed.json"),
        r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "dns", "namespace": "kube-system"},
             "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}]}"#,
    );
    write(&dir.path().join("notes.txt"), "not a manifest: [");
    write(&dir.path().join(".hidden.yaml"), "not: [a manifest");

    // Without --file-cluster-annotation the annotation moves nothing.
    let mut plain = Running::start(vec![dir.path().into()], Duration::from_millis(50));
    let state = plain.synced().await;
    assert_eq!(
        service_names(&state),
        [
            "default/kube-system/dns",
            "default/shop/api",
            "default/shop/web"
        ]
    );
    plain.stop().await;

    let mut src = Running::start_source(
        FileSource::new(
            vec![dir.path().into()],
            "default".into(),
            Debounce::quiet(Duration::from_millis(50)),
        )
        .with_cluster_annotation(true),
    );
    let state = src.synced().await;
    assert_eq!(state.errors, [], "no errors expected");
    assert_eq!(
        service_names(&state),
        [
            "default/kube-system/dns",
            "default/shop/web",
            "east/shop/api"
        ]
    );
    let dns = state
        .services
        .iter()
        .find(|s| s.key.name == "dns")
        .expect("dns");
    assert_eq!(dns.ports[0].protocol, Protocol::Udp);
    let api = state
        .services
        .iter()
        .find(|s| s.key.name == "api")
        .expect("api");
    assert!(api.cluster_ips.is_empty(), "left for the index to allocate");
    assert_eq!(state.slices.len(), 1);
    assert_eq!(
        state.slices.first().expect("a slice").service,
        ServiceKey::new("default", "shop", "web")
    );
    src.stop().await;
}

#[tokio::test]
async fn a_change_is_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("web.yaml");
    write(&file, &svc("web", "10.96.0.10", 80));
    let mut src = Running::start(vec![file.clone()], Duration::from_millis(50));
    let state = src.synced().await;
    assert_eq!(state.services.first().expect("a Service").ports[0].port, 80);

    write(&file, &svc("web", "10.96.0.10", 8080));
    let state = src
        .wait_for("the new port", |s| {
            s.services.first().is_some_and(|s| s.ports[0].port == 8080)
        })
        .await;
    assert_eq!(state.errors, []);

    // Editors save by writing a new file and renaming it over the old one.
    let tmp = dir.path().join(".web.yaml.swp");
    write(&tmp, &svc("web", "10.96.0.10", 9090));
    std::fs::rename(&tmp, &file).expect("rename");
    src.wait_for("the renamed-in port", |s| {
        s.services.first().is_some_and(|s| s.ports[0].port == 9090)
    })
    .await;
    src.stop().await;
}

#[tokio::test]
async fn an_invalid_document_is_skipped_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mixed.yaml");
    write(
        &file,
        &format!(
            "{}---\n{}---\n{}---\n{}",
            svc("web", "10.96.0.10", 80),
            svc("bad", "10.96.0.999", 80),
            "apiVersion: v1\nkind: Service\nspec:\n  ports: eighty\n",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: twoports\n  namespace: shop\n\
             spec:\n  ports: [{port: 80}, {port: 81}]\n",
        ),
    );
    let mut src = Running::start(vec![file.clone()], Duration::from_millis(50));
    let state = src.synced().await;
    assert_eq!(service_names(&state), ["default/shop/web"]);

    let errs: Vec<_> = state
        .errors
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str()))
        .collect();
    let doc3 = format!("{}#3", file.display());
    assert_eq!(
        errs,
        [
            ("Service shop/bad", "spec.clusterIP"),
            (doc3.as_str(), "spec.ports"),
            ("Service shop/twoports", "spec.ports[0].name"),
            ("Service shop/twoports", "spec.ports[1].name"),
        ]
    );
    let source = format!("file:{}", file.display());
    assert!(state.errors.iter().all(|e| e.source == source));
    assert!(
        state.errors[0]
            .message
            .ends_with(&format!("(in {}#2)", file.display())),
        "errors say where the object is: {}",
        state.errors[0].message
    );
    src.stop().await;
}

#[tokio::test]
async fn broken_yaml_keeps_the_previous_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("web.yaml");
    write(&file, &svc("web", "10.96.0.10", 80));
    let mut src = Running::start(vec![dir.path().into()], Duration::from_millis(50));
    src.synced().await;

    write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: [web\n",
    );
    let object = file.display().to_string();
    let state = src
        .wait_for("the broken file's error", |s| {
            s.errors.iter().any(|e| e.object == object)
        })
        .await;
    assert_eq!(state.errors.len(), 1, "{:?}", state.errors);
    assert_eq!(state.errors[0].field, "");
    assert!(
        state.errors[0].message.starts_with("not valid YAML: "),
        "{}",
        state.errors[0].message
    );
    assert_eq!(service_names(&state), ["default/shop/web"], "still served");
    assert_eq!(state.services.first().expect("a Service").ports[0].port, 80);

    write(&file, &svc("web", "10.96.0.10", 81));
    let state = src
        .wait_for("the repaired file", |s| {
            s.services.first().is_some_and(|s| s.ports[0].port == 81)
        })
        .await;
    assert_eq!(state.errors, []);
    src.stop().await;
}

#[tokio::test]
async fn files_added_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("web.yaml"), &svc("web", "10.96.0.10", 80));
    let mut src = Running::start(vec![dir.path().into()], Duration::from_millis(50));
    src.synced().await;

    std::fs::create_dir(dir.path().join("team")).expect("mkdir");
    write(
        &dir.path().join("team/api.yml"),
        &svc("api", "10.96.0.11", 80),
    );
    src.wait_for("the added file", |s| s.services.len() == 2)
        .await;

    std::fs::remove_file(dir.path().join("web.yaml")).expect("rm");
    let state = src
        .wait_for("the deleted file's Service to go", |s| {
            s.services.len() == 1
        })
        .await;
    assert_eq!(service_names(&state), ["default/shop/api"]);
    assert_eq!(state.errors, []);
    src.stop().await;
}

#[tokio::test]
async fn a_burst_of_writes_is_one_publish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("web.yaml");
    write(&file, &svc("web", "10.96.0.10", 1000));
    let debounce = Duration::from_millis(300);
    let mut src = Running::start(vec![file.clone()], debounce);
    src.synced().await;

    // Publishes are at least one debounce window apart, so a task that waits
    // on the channel sees each of them.
    let publishes = Arc::new(AtomicUsize::new(0));
    let mut rx = src.states.clone();
    rx.mark_unchanged();
    let counter = tokio::spawn({
        let publishes = publishes.clone();
        async move {
            while rx.changed().await.is_ok() {
                publishes.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    for port in 1001..=1020 {
        write(&file, &svc("web", "10.96.0.10", port));
    }
    src.wait_for("the last write", |s| {
        s.services.first().is_some_and(|s| s.ports[0].port == 1020)
    })
    .await;
    // Give a wrongly split burst the time to show a second publish.
    tokio::time::sleep(debounce * 3).await;
    assert_eq!(publishes.load(Ordering::SeqCst), 1);
    src.stop().await;
    counter.await.expect("counter");
}

#[tokio::test]
async fn a_missing_path_is_not_synced_until_it_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("conf");
    let mut src = Running::start(vec![conf.clone()], Duration::from_millis(50));
    // A mistyped PATH is not an empty cluster: nothing is synced, and the
    // error names the path.
    let state = src
        .wait_for("the missing path reported", |s| s.last_error.is_some())
        .await;
    assert!(!state.synced, "a missing path must not count as synced");
    assert!(state.services.is_empty());
    let message = state.last_error.expect("last_error");
    assert!(
        message.contains(&conf.display().to_string()) && message.contains("does not exist"),
        "{message}"
    );

    std::fs::create_dir(&conf).expect("mkdir");
    write(&conf.join("web.yaml"), &svc("web", "10.96.0.10", 80));
    let state = src
        .wait_for("the Service in the new directory", |s| {
            s.services.len() == 1
        })
        .await;
    assert!(state.synced);
    assert_eq!(state.errors, []);
    assert_eq!(state.last_error, None);
    src.stop().await;
}

#[tokio::test]
async fn a_path_that_disappears_keeps_what_it_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).expect("mkdir");
    write(&conf.join("web.yaml"), &svc("web", "10.96.0.10", 80));
    let mut src = Running::start(vec![conf.clone()], Duration::from_millis(50));
    let state = src.synced().await;
    assert_eq!(service_names(&state), ["default/shop/web"]);

    // The directory goes away (an unmounted volume, a moved checkout).
    let aside = dir.path().join("aside");
    std::fs::rename(&conf, &aside).expect("move away");
    let state = src
        .wait_for("the vanished path reported", |s| s.last_error.is_some())
        .await;
    assert!(state.synced);
    assert_eq!(
        service_names(&state),
        ["default/shop/web"],
        "nothing dropped"
    );

    std::fs::rename(&aside, &conf).expect("move back");
    let state = src
        .wait_for("the error to clear", |s| s.last_error.is_none())
        .await;
    assert_eq!(service_names(&state), ["default/shop/web"]);
    src.stop().await;
}

#[tokio::test]
async fn the_first_definition_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("a.yaml"), &svc("web", "10.96.0.10", 80));
    write(&dir.path().join("b.yaml"), &svc("web", "10.96.0.20", 80));
    let mut src = Running::start(vec![dir.path().into()], Duration::from_millis(50));
    let state = src.synced().await;
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        state.services.first().expect("a Service").cluster_ips,
        ["10.96.0.10".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(state.errors.len(), 1);
    assert_eq!(state.errors[0].object, "Service shop/web");
    assert!(
        state.errors[0].message.contains("b.yaml#1"),
        "{}",
        state.errors[0].message
    );
    src.stop().await;
}

#[tokio::test]
async fn the_examples_load_cleanly() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut src = Running::start(vec![examples], Duration::from_millis(50));
    let state = src.synced().await;
    assert_eq!(state.errors, [], "examples must load without errors");
    assert!(
        service_names(&state).contains(&"default/shop/web".to_owned()),
        "{:?}",
        service_names(&state)
    );
    let types: Vec<_> = state.services.iter().map(|s| s.service_type).collect();
    assert!(types.contains(&ServiceType::NodePort));
    assert!(types.contains(&ServiceType::ExternalName));
    assert!(state.services.iter().any(|s| s.headless));
    for s in &state.services {
        let slices: Vec<_> = state
            .slices
            .iter()
            .filter(|sl| sl.service == s.key)
            .map(|sl| sl.slice.clone())
            .collect();
        let mut full = switchyard_model::ServiceState {
            service: (**s).clone(),
            slices,
        };
        full.normalize();
        full.validate()
            .expect("example Services are valid as given");
    }
    let web = state
        .slices
        .iter()
        .find(|s| s.service.name == "web")
        .expect("web slice");
    assert_eq!(web.slice.endpoints.len(), 3);
    src.stop().await;
}

#[test]
fn name_lists_the_paths() {
    let src = FileSource::new(
        vec!["/etc/a.yaml".into(), "/etc/more".into()],
        "default".into(),
        Debounce::quiet(Duration::from_millis(100)),
    );
    assert_eq!(src.name(), "file:/etc/a.yaml,/etc/more");
}

#[tokio::test]
async fn ignored_input_is_a_warning_with_file_and_document_and_type_errors_name_their_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("app.yaml");
    write(
        &file,
        "apiVersion: v1\nkind: Servce\nmetadata: {name: typo, namespace: shop}\n---\n\
         apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old, namespace: shop}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  clusterIp: 10.96.0.10\n  ports:\n  - port: 80\n    portz: 8080\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\n\
         spec:\n  ports:\n  - port: \"80\"\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\n",
    );
    let mut src = Running::start(vec![dir.path().into()], Duration::from_millis(50));
    let state = src.synced().await;
    let at = |n: usize| format!("{}#{n}", file.display());
    let find = |object: &str, field: &str| {
        state
            .warnings
            .iter()
            .find(|w| w.object == object && w.field == field)
            .unwrap_or_else(|| panic!("no warning for {object} {field}: {:#?}", state.warnings))
            .message
            .clone()
    };
    assert!(find(&at(1), "kind").contains("did you mean Service"));
    assert!(find(&at(2), "apiVersion").contains("discovery.k8s.io/v1"));
    assert!(find(&at(3), "kind").contains("EndpointSlices"));
    assert!(find("Service shop/web", "spec.clusterIp").contains(&at(4)));
    assert!(find("Service shop/web", "spec.ports[0].portz").contains("unknown field"));
    let others = find(&file.display().to_string(), "");
    assert!(others.contains("apps/v1 Deployment x2"), "{others}");
    // The Service with unknown fields is still used; the one with a type error is not.
    assert_eq!(service_names(&state), ["default/shop/web"]);
    let bad = state
        .errors
        .iter()
        .find(|e| e.object == "Service shop/bad")
        .expect("the type error");
    assert_eq!(bad.field, "spec.ports[0].port");
    assert!(
        bad.message.starts_with("expected an integer, got \"80\""),
        "{}",
        bad.message
    );
    src.stop().await;
}
