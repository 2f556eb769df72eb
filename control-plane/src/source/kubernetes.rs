//! The `kube` source: Services, EndpointSlices and Nodes from a Kubernetes
//! API server, through kube-rs watchers and reflector stores.
//!
//! ```text
//!  Api<Service>       ─ watcher ─ backoff ─ reflector(store) ─┐
//!  Api<EndpointSlice> ─ watcher ─ backoff ─ reflector(store) ─┼─ signals ─▶ coalesce ─▶ convert changed
//!  Api<Node>          ─ watcher ─ backoff ─ reflector(store) ─┘             objects (cache by rv)
//!                                                                          ─▶ watch<SourceState>
//! ```
//!
//! Each watcher lists (paged) and then watches with bookmarks; after a
//! 410 Gone, a restart or a dropped watch it relists. A reflector store
//! applies a relist (`Init` .. `InitApply` .. `InitDone`) atomically: it
//! buffers the listed objects and swaps them in at `InitDone`. This source
//! additionally publishes nothing while any kind is relisting, so a relist
//! becomes exactly one new state and no agent sees a Service vanish and
//! come back. The state is `synced` once all three kinds have been listed.
//!
//! Bursts of events coalesce: a state is published once the stream has been
//! quiet for the debounce window (capped at four windows). Converting an
//! object is cached by its resourceVersion, so a publish converts only what
//! changed. Objects that do not convert are skipped and reported, the rest
//! keep flowing. FQDN EndpointSlices are ignored, as kube-proxy ignores them.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::{ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource, ResourceExt};
use switchyard_model::{ServiceKey, ValidationErrors};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::debounce::{Burst, Debounce};
use super::{Export, NodeInfo, ObjectError, Source, SourceService, SourceSlice, SourceState};
use crate::k8s;

/// The label that carries a Node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How to reach the API server and what to watch.
#[derive(Debug, Clone, Default)]
pub struct KubeSourceConfig {
    /// Context of the kubeconfig to use; `None` is the current context, or
    /// the in-cluster configuration when there is no kubeconfig.
    pub context: Option<String>,
    /// Kubeconfig file; `None` is `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Watch Services and EndpointSlices of this namespace only.
    pub namespace: Option<String>,
    /// Watch only Services and EndpointSlices with these labels.
    pub label_selector: Option<String>,
    /// Cluster id of every object. The `switchyard.io/cluster` annotation is
    /// ignored here: anyone who may edit a Service in the API server must not
    /// be able to move it into another cluster's view.
    pub cluster: String,
    /// How a burst of events coalesces into one publication.
    pub debounce: Debounce,
}

/// Why the source cannot talk to the API server at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or does not hold the context.
    #[error("kubeconfig")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// Neither a kubeconfig nor an in-cluster configuration was found.
    #[error("no kubeconfig and not running in a cluster")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("building the Kubernetes client")]
    Client(#[from] kube::Error),
}

/// Serves what a Kubernetes API server holds.
#[derive(Debug, Clone)]
pub struct KubeSource {
    config: KubeSourceConfig,
}

impl KubeSource {
    /// A source configured by `config`.
    pub fn new(config: KubeSourceConfig) -> Self {
        Self { config }
    }
}

impl Source for KubeSource {
    fn knows_nodes(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        match &self.config.context {
            Some(c) => format!("kube:{c}"),
            None => "kube".to_owned(),
        }
    }

    fn cluster(&self) -> String {
        self.config.cluster.clone()
    }

    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(*self, state, shutdown))
    }
}

/// Builds a client from the configured kubeconfig, context or environment.
pub async fn client(config: &KubeSourceConfig) -> Result<Client, Error> {
    let (config, _) = client_config(config).await?;
    Ok(Client::try_from(config)?)
}

/// The client configuration and the API server's URL.
async fn client_config(config: &KubeSourceConfig) -> Result<(Config, String), Error> {
    let options = KubeConfigOptions {
        context: config.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&config.kubeconfig, &config.context) {
        (Some(path), _) => {
            Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options).await?,
        (None, None) => Config::infer().await?,
    };
    let url = config.cluster_url.to_string();
    Ok((config, url.trim_end_matches('/').to_owned()))
}

/// A client whose every successful answer to a list or watch is reported
/// on `answers` with its kind: after a failure, that is how the source
/// learns that a watch is back (a resumed watch brings no event until
/// something changes, and kube-rs keeps its bookmarks to itself).
fn observed_client(config: Config, answers: mpsc::Sender<Kind>) -> Result<Client, Error> {
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(&AnswerObserver { answers }).build())
}

/// Reports successful answers by kind (see [`observed_client`]).
#[derive(Debug, Clone)]
struct AnswerObserver {
    answers: mpsc::Sender<Kind>,
}

impl<S> tower::Layer<S> for AnswerObserver {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            answers: self.answers.clone(),
        }
    }
}

/// The service [`AnswerObserver`] wraps around the client's stack.
#[derive(Debug, Clone)]
struct Observed<S> {
    inner: S,
    answers: mpsc::Sender<Kind>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let kind = Kind::of_path(request.uri().path());
        let answered = self.inner.call(request);
        let answers = self.answers.clone();
        Box::pin(async move {
            let response = answered.await;
            if let (Some(kind), Ok(r)) = (kind, &response)
                && r.status().is_success()
            {
                // Full: a report is already waiting, which says the same.
                let _ = answers.try_send(kind);
            }
            response
        })
    }
}

/// The kinds watched, as indexes into per-kind arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service = 0,
    Slice = 1,
    Node = 2,
    Export = 3,
}

impl Kind {
    /// The kind a request path lists or watches (`/api/v1/services`,
    /// `/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices`).
    fn of_path(path: &str) -> Option<Self> {
        match path.rsplit('/').next()? {
            "services" => Some(Kind::Service),
            "endpointslices" => Some(Kind::Slice),
            "nodes" => Some(Kind::Node),
            "serviceexports" => Some(Kind::Export),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Slice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Export => "serviceexports",
        }
    }
}

/// The MCS API's ServiceExport (`multicluster.x-k8s.io/v1alpha1`), watched
/// as a dynamic object: only its name, namespace and creation time matter.
pub fn service_export_resource() -> ApiResource {
    ApiResource {
        group: "multicluster.x-k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "multicluster.x-k8s.io/v1alpha1".into(),
        kind: "ServiceExport".into(),
        plural: "serviceexports".into(),
    }
}

/// Whether a watch error says the resource is not served (a 404: the MCS
/// CRDs are not installed), which means "nothing is exported", not a failure.
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// What a watcher stream told us, without the object (the store has it).
#[derive(Debug)]
enum Signal {
    /// A relist started: the store keeps its old content until `InitDone`.
    Init,
    /// A relist finished and the store was replaced.
    InitDone,
    /// An object was added, changed or deleted.
    Changed,
    /// The watch or list failed; the watcher retries after a backoff.
    Failed(String),
    /// The API server does not serve the kind (404); retried like a failure.
    NotServed,
    /// The API server answered a list or watch of this kind.
    Answered,
}

fn signals<K>(
    kind: Kind,
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
) -> Pin<Box<dyn Stream<Item = (Kind, Signal)> + Send>>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let events = reflector::reflector(writer, watcher(api, config).default_backoff());
    events
        .filter_map(move |r| async move {
            let signal = match r {
                Ok(watcher::Event::Init) => Signal::Init,
                Ok(watcher::Event::InitApply(_)) => return None,
                Ok(watcher::Event::InitDone) => Signal::InitDone,
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Signal::Changed,
                Err(e) if not_served(&e) => Signal::NotServed,
                Err(e) => Signal::Failed(error_chain(&e)),
            };
            Some((kind, signal))
        })
        .boxed()
}

/// The error and its causes, each said once: kube, hyper and the OS often
/// repeat their cause inside their own message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

async fn run(source: KubeSource, state: watch::Sender<SourceState>, shutdown: CancellationToken) {
    let name = source.name();
    let config = source.config;
    let mut backoff = Duration::from_millis(500);
    let (answers_tx, answers) = mpsc::channel(16);
    let (client, url) = loop {
        let built = match client_config(&config).await {
            Ok((c, url)) => observed_client(c, answers_tx.clone()).map(|c| (c, url)),
            Err(e) => Err(e),
        };
        match built {
            Ok(c) => break c,
            Err(e) => {
                let message = error_chain(&e);
                tracing::error!(source = %name, error = %message, "cannot configure the Kubernetes client; retrying");
                state.send_if_modified(|s| {
                    let new = Some(message.clone());
                    (s.last_error != new).then(|| s.last_error = new).is_some()
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };

    let mut wc = watcher::Config::default();
    if let Some(sel) = &config.label_selector {
        wc = wc.labels(sel);
    }
    let namespaced = |client: Client| match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (services, slices): (Api<core::Service>, Api<discovery::EndpointSlice>) =
        namespaced(client.clone());
    let nodes: Api<core::Node> = Api::all(client.clone());
    let export_resource = service_export_resource();
    let exports: Api<DynamicObject> = match &config.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &export_resource),
        None => Api::all_with(client, &export_resource),
    };
    let (service_store, w1) = reflector::store();
    let (slice_store, w2) = reflector::store();
    let (node_store, w3) = reflector::store();
    let w4 = reflector::store::Writer::new(export_resource);
    let export_store = w4.as_reader();
    let answered = tokio_stream::wrappers::ReceiverStream::new(answers)
        .map(|kind| (kind, Signal::Answered))
        .boxed();
    let mut stream = futures::stream::select_all([
        signals(Kind::Service, w1, services, wc.clone()),
        signals(Kind::Slice, w2, slices, wc),
        signals(Kind::Node, w3, nodes, watcher::Config::default()),
        // Exports are not filtered by the label selector: a ServiceExport
        // names its Service and carries no labels of it.
        signals(Kind::Export, w4, exports, watcher::Config::default()),
        answered,
    ]);

    let mut view = View {
        source: name.clone(),
        cluster: config.cluster.clone(),
        services: service_store,
        slices: slice_store,
        nodes: node_store,
        exports: export_store,
        service_cache: HashMap::new(),
        slice_cache: HashMap::new(),
    };
    let mut listing = [true; 4];
    let mut listed = [false; 4];
    let mut errors: [Option<String>; 4] = Default::default();
    let mut dirty = false;
    loop {
        // One burst: the first signal, then everything until a quiet window.
        let mut burst = Burst::default();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = burst.ended() => break,
                n = stream.next() => n,
            };
            let Some((kind, signal)) = next else {
                // The watchers retry forever; an ended stream means shutdown.
                return;
            };
            let i = kind as usize;
            match signal {
                Signal::Init => {
                    listing[i] = true;
                    if listed[i] {
                        tracing::info!(source = %name, kind = kind.name(), "relisting");
                    }
                }
                Signal::InitDone => {
                    listing[i] = false;
                    listed[i] = true;
                    if errors[i].take().is_some() {
                        tracing::info!(source = %name, kind = kind.name(), api_server = %url, "watch recovered (relisted)");
                    }
                    dirty = true;
                }
                Signal::Changed => {
                    if errors[i].take().is_some() {
                        tracing::info!(source = %name, kind = kind.name(), api_server = %url, "watch recovered");
                    }
                    dirty = true;
                }
                Signal::Failed(message) => {
                    tracing::warn!(source = %name, kind = kind.name(), api_server = %url, error = %message, "watch failed; retrying with backoff");
                    errors[i] = Some(format!("{} from {url}: {message}", kind.name()));
                }
                Signal::Answered => {
                    if errors[i].take().is_none() {
                        // The usual case, a page or a watch answered: no news.
                        continue;
                    }
                    tracing::info!(source = %name, kind = kind.name(), api_server = %url, "watch recovered");
                }
                Signal::NotServed => {
                    // No MCS CRDs: nothing is exported, which is no failure.
                    if !listed[i] {
                        tracing::info!(source = %name, kind = kind.name(), "not served by the API server (MCS CRDs not installed?); nothing is exported from it");
                    }
                    listed[i] = true;
                    listing[i] = false;
                    errors[i] = None;
                }
            }
            burst.change(config.debounce, Instant::now());
        }

        let last_error = {
            let all: Vec<&str> = errors.iter().flatten().map(String::as_str).collect();
            (!all.is_empty()).then(|| all.join("; "))
        };
        // Exports only add to the clusterset: the source is synced once
        // Services, slices and Nodes are listed.
        let synced = listed[..3].iter().all(|l| *l);
        // Publish objects only when every kind holds a complete list: never
        // a partial initial list, never in the middle of a relist.
        if dirty && synced && !listing[..3].iter().any(|l| *l) && !(listed[3] && listing[3]) {
            dirty = false;
            let mut new = view.build();
            new.last_error = last_error;
            // Derived from what was published, the maps share what did not
            // change, and the index patches in a change of endpoints.
            super::share_unchanged(&state.borrow(), &mut new);
            super::publish(&state, &name, new);
        } else {
            state.send_if_modified(|s| {
                let changed = s.last_error != last_error;
                s.last_error.clone_from(&last_error);
                changed
            });
        }
    }
}

/// A converted object, remembered with the resourceVersion it came from.
#[derive(Debug)]
struct Converted<T> {
    resource_version: String,
    value: Result<T, Vec<ObjectError>>,
}

/// The reflector stores and the conversions of their objects.
struct View {
    source: String,
    cluster: String,
    services: Store<core::Service>,
    slices: Store<discovery::EndpointSlice>,
    nodes: Store<core::Node>,
    exports: Store<DynamicObject>,
    service_cache: HashMap<(String, String), Converted<Arc<SourceService>>>,
    slice_cache: HashMap<(String, String), Converted<Option<Arc<SourceSlice>>>>,
}

impl View {
    /// The whole state from the stores, converting only objects whose
    /// resourceVersion changed since the last build.
    fn build(&mut self) -> SourceState {
        let mut out = SourceState {
            synced: true,
            ..SourceState::default()
        };
        let (source, cluster) = (self.source.as_str(), self.cluster.as_str());
        let services = self.services.state();
        refresh(&mut self.service_cache, &services, |svc| {
            k8s::service(cluster, svc)
                .and_then(|s| k8s::validate_unallocated(&s).map(|()| Arc::new(s)))
                .map_err(|e| object_errors(source, e))
        });
        for c in self.service_cache.values() {
            match &c.value {
                Ok(s) => out.services.push(s.clone()),
                Err(e) => out.errors.extend(e.iter().cloned()),
            }
        }
        let slices = self.slices.state();
        refresh(&mut self.slice_cache, &slices, |slice| {
            k8s::endpoint_slice(cluster, slice)
                .map(|s| s.map(Arc::new))
                .map_err(|e| object_errors(source, e))
        });
        for c in self.slice_cache.values() {
            match &c.value {
                Ok(Some(s)) => out.slices.push(s.clone()),
                Ok(None) => {}
                Err(e) => out.errors.extend(e.iter().cloned()),
            }
        }
        out.nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| NodeInfo {
                name: n.name_any(),
                zone: n.labels().get(ZONE_LABEL).cloned(),
            })
            .collect();
        out.exports = self
            .exports
            .state()
            .iter()
            .map(|e| Export {
                // The source's cluster, as for Services: kube sources never
                // honour the cluster annotation.
                key: ServiceKey::new(
                    cluster.to_owned(),
                    e.namespace().unwrap_or_else(|| "default".into()),
                    e.name_any(),
                ),
                created_unix: e.creation_timestamp().map(|t| t.0.as_second()),
            })
            .collect();
        out.exports.sort_by(|a, b| a.key.cmp(&b.key));
        // Stores are hash maps: sort so that equal content compares equal
        // (Services and slices are in maps by key).
        out.errors
            .sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
        out.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("source", &self.source)
            .field("services", &self.service_cache.len())
            .field("slices", &self.slice_cache.len())
            .finish_non_exhaustive()
    }
}

/// Brings `cache` in line with `objects`: converts new and changed objects,
/// forgets deleted ones.
fn refresh<K, T>(
    cache: &mut HashMap<(String, String), Converted<T>>,
    objects: &[Arc<K>],
    convert: impl Fn(&K) -> Result<T, Vec<ObjectError>>,
) where
    K: Resource,
{
    let mut seen = std::collections::HashSet::with_capacity(objects.len());
    for obj in objects {
        let key = (obj.namespace().unwrap_or_default(), obj.name_any());
        let rv = obj.resource_version().unwrap_or_default();
        let fresh = cache
            .get(&key)
            .is_some_and(|c| !rv.is_empty() && c.resource_version == rv);
        if !fresh {
            cache.insert(
                key.clone(),
                Converted {
                    resource_version: rv,
                    value: convert(obj),
                },
            );
        }
        seen.insert(key);
    }
    if seen.len() != cache.len() {
        cache.retain(|k, _| seen.contains(k));
    }
}

fn object_errors(source: &str, e: ValidationErrors) -> Vec<ObjectError> {
    e.0.into_iter()
        .map(|e| ObjectError {
            source: source.to_owned(),
            object: e.object,
            field: e.field,
            message: e.message,
        })
        .collect()
}
