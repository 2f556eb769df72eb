//! The `kube` source: Services, EndpointSlices, Nodes, ServiceExports,
//! ServiceImports and the kube-dns ConfigMap from a Kubernetes API server,
//! through kube-rs watchers.
//!
//! ```text
//!  watcher ─ backoff ─▶ Init | InitApply(obj) | InitDone | Apply(obj) | Delete(obj) | Failed
//!                           │ each event, at once: convert (cached by resourceVersion) and change
//!                           ▼ the persistent Service and slice maps in one place (a relist: at InitDone)
//!    coalesce (source/debounce.rs): quiet for --debounce, at most --max-delay ─▶ any kind relisting? hold
//!                           ▼
//!    state: pointer copies of the maps (+ errors, Nodes, exports, remade only when they changed) ─▶ send_if_modified
//! ```
//!
//! What is watched. `--source kube` / `kube:CONTEXT` builds a client from
//! `--kubeconfig`, a named context, or inference (`$KUBECONFIG`,
//! `~/.kube/config`, in-cluster). Services and discovery/v1 EndpointSlices
//! of all namespaces or `--kube-namespace`, optionally filtered by
//! `--kube-label-selector`; Nodes cluster-wide (published as `nodes` with
//! their `topology.kubernetes.io/zone`, shown in `/status`); ServiceExports
//! (with their `exportedLabels`/`exportedAnnotations`) and ServiceImports
//! (the record of ClusterSet IPs, `service_imports`) when the MCS CRDs are
//! served, in `v1beta1` where it is served, else `v1alpha1`, found by
//! discovery and again whenever the watched version answers 404
//! (`mcs_signals`); the kube-dns ConfigMap (`--kube-dns-configmap`, by a
//! field selector on its name), whose `stubDomains` and
//! `upstreamNameservers` become the source's `dns` and reach the cluster's
//! agents as `SnapshotUpdate.cluster_dns`, sent like the Node facts (a 403
//! or 404 there only means no such settings).
//!
//! Each watcher runs with `default_backoff()` and bookmarks, lists in pages
//! of 500, then watches from the list's resourceVersion; a dropped watch
//! resumes from the last one seen; a 410 Gone (compaction), an API server
//! restart that lost its watch cache, or a restart of our own process
//! relists. A relist (`Init` .. `InitApply` .. `InitDone`) is applied
//! atomically: its objects are converted as they arrive (the API objects
//! are dropped page by page), the conversions replace the kind's at
//! `InitDone`, and what the list no longer holds is deleted. This source
//! additionally publishes nothing while any kind is relisting, so a relist
//! becomes exactly one new state: a Service present before and after is
//! present in every state an agent sees (tested by recording every state a
//! data plane applied). Kinds relist independently: after a relist a
//! Service may move before its slices do, which delays a change but
//! removes nothing. The state is `synced` once Services, slices and Nodes
//! have been listed, so the index (and `/readyz`) wait for every initial
//! list.
//!
//! Work per event is the event's: the source keeps no store of API
//! objects, only their conversions. Every event changes the maps the
//! source publishes in one place: the published Services and slices are
//! persistent maps (`Objects`), so a publication is a pointer copy, shares
//! everything unchanged with the one before it, and costs what changed, not
//! the size of the cluster. The index then sees the change by diffing the
//! maps (an endpoint change is patched into the last snapshot). An object
//! that converts to what it was (a status we do not read changed) keeps its
//! `Arc` and changes nothing. A state costs O(objects) to assemble only on
//! a relist, and bursts of events coalesce here (quiet for `--debounce`,
//! at most `--max-delay`, [`super::debounce`]), the only wait on the way to
//! the agents.
//!
//! Objects that do not convert are skipped and reported in `errors` (hence
//! `/status` `invalid_objects` and the
//! `switchyard_control_plane_invalid_objects` metric); the rest keep
//! flowing. FQDN EndpointSlices are ignored (`k8s::endpoint_slice`), as
//! kube-proxy ignores them; slices of one Service are merged by the index.
//! Watch failures are logged and shown as the source's `last_error`, which
//! names the API server's URL once. It clears, with a `watch recovered` log
//! line, as soon as the API server answers a list or watch of that kind
//! again, which `AnswerObserver` (a tower layer on the client) reports:
//! a resumed watch brings no event until something changes.

use std::collections::{BTreeMap, HashMap, HashSet};
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
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource, ResourceExt};
use switchyard_model::{ServiceKey, ValidationErrors};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::debounce::{Burst, Debounce};
use super::{
    Export, Keyed, NodeInfo, ObjectError, Objects, Source, SourceService, SourceSlice, SourceState,
};
use crate::k8s;

/// The label that carries a Node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Why `node` is leaving the cluster, as kube-proxy's health server judges
/// it (KEP-3836): it is being deleted, or the cluster autoscaler tainted it.
fn node_draining(node: &core::Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("deleted".into());
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == super::TO_BE_DELETED_TAINT));
    tainted.then(|| super::TO_BE_DELETED_TAINT.to_owned())
}

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
    /// The kube-dns ConfigMap (namespace, name) whose stub domains and
    /// upstream nameservers go to the agents; `None`: not read.
    pub dns_configmap: Option<(String, String)>,
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
    write_back: Option<crate::mcs::writer::WriteBack>,
}

impl KubeSource {
    /// A source configured by `config`.
    pub fn new(config: KubeSourceConfig) -> Self {
        Self {
            config,
            write_back: None,
        }
    }
}

impl Source for KubeSource {
    fn knows_nodes(&self) -> bool {
        true
    }

    fn attach_write_back(&mut self, write_back: crate::mcs::writer::WriteBack) {
        self.write_back = Some(write_back);
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
    Dns = 4,
    Import = 5,
}

/// How many kinds are watched.
const KINDS: usize = 6;

impl Kind {
    /// The kind a request path lists or watches (`/api/v1/services`,
    /// `/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices`).
    fn of_path(path: &str) -> Option<Self> {
        match path.rsplit('/').next()? {
            "services" => Some(Kind::Service),
            "endpointslices" => Some(Kind::Slice),
            "nodes" => Some(Kind::Node),
            "serviceexports" => Some(Kind::Export),
            "configmaps" => Some(Kind::Dns),
            "serviceimports" => Some(Kind::Import),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Slice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Export => "serviceexports",
            Kind::Dns => "configmaps",
            Kind::Import => "serviceimports",
        }
    }
}

/// The MCS API's group, and its versions in order of preference: v1beta1
/// (MCS API v0.5) where the API server serves it, else v1alpha1.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// See [`MCS_GROUP`].
pub const MCS_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];

/// An MCS API kind (`ServiceExport`, `ServiceImport`) in `version`, for a
/// dynamic client: the objects are read and written as JSON.
pub fn mcs_resource(kind: &str, version: &str) -> ApiResource {
    ApiResource {
        group: MCS_GROUP.into(),
        version: version.into(),
        api_version: format!("{MCS_GROUP}/{version}"),
        kind: kind.into(),
        plural: format!("{}s", kind.to_lowercase()),
    }
}

/// The MCS version in which the API server serves `kind`, the preferred
/// one first; `None` when it serves neither (the CRDs are not installed).
pub async fn served_mcs_version(
    client: &Client,
    kind: &str,
) -> Result<Option<&'static str>, kube::Error> {
    for version in MCS_VERSIONS {
        match client
            .list_api_group_resources(&format!("{MCS_GROUP}/{version}"))
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.kind == kind) => return Ok(Some(version)),
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Whether a watch error says the resource is not served (a 404: the MCS
/// CRDs are not installed), which means "nothing is exported", not a
/// failure; for the kube-dns ConfigMap, a 403 too (the RBAC does not grant
/// it: the agents keep their own DNS settings).
fn not_served(kind: Kind, e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    code == 404 || (kind == Kind::Dns && code == 403)
}

/// An object a watcher brought, of the kind it watches.
#[derive(Debug)]
enum Object {
    Service(Box<core::Service>),
    Slice(Box<discovery::EndpointSlice>),
    Node(Box<core::Node>),
    Export(Box<DynamicObject>),
    Dns(Box<core::ConfigMap>),
    Import(Box<DynamicObject>),
}

/// What a watcher stream told us.
#[derive(Debug)]
enum Signal {
    /// A relist started: what the source holds stays until `InitDone`.
    Init,
    /// One object of the relist in progress.
    Listed(Object),
    /// The relist finished: the listed objects replace the kind's.
    InitDone,
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted(Object),
    /// The watch or list failed; the watcher retries after a backoff.
    Failed(String),
    /// The API server does not serve the kind (404); retried like a failure.
    NotServed,
    /// The API server answered a list or watch of this kind.
    Answered,
}

fn signals<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
) -> Pin<Box<dyn Stream<Item = (Kind, Signal)> + Send>>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| {
            let signal = match r {
                Ok(watcher::Event::Init) => Signal::Init,
                Ok(watcher::Event::InitApply(o)) => Signal::Listed(wrap(o)),
                Ok(watcher::Event::InitDone) => Signal::InitDone,
                Ok(watcher::Event::Apply(o)) => Signal::Applied(wrap(o)),
                Ok(watcher::Event::Delete(o)) => Signal::Deleted(wrap(o)),
                Err(e) if not_served(kind, &e) => Signal::NotServed,
                Err(e) => Signal::Failed(error_chain(&e)),
            };
            (kind, signal)
        })
        .boxed()
}

/// The signals of an MCS kind, in the version the API server serves (see
/// [`served_mcs_version`]): found by discovery before the watch starts and
/// again whenever the watch finds the kind gone (a 404: the CRDs were
/// removed or upgraded). While neither version is served the stream says
/// `NotServed` and looks again after a growing pause.
fn mcs_signals(
    kind: Kind,
    client: Client,
    namespace: Option<String>,
    mcs_kind: &'static str,
    wrap: fn(DynamicObject) -> Object,
) -> Pin<Box<dyn Stream<Item = (Kind, Signal)> + Send>> {
    const FIRST_PAUSE: Duration = Duration::from_millis(500);
    enum Step {
        Discover(Duration),
        Watch(Pin<Box<dyn Stream<Item = (Kind, Signal)> + Send>>),
    }
    futures::stream::unfold(Step::Discover(Duration::ZERO), move |step| {
        let client = client.clone();
        let namespace = namespace.clone();
        async move {
            match step {
                Step::Discover(pause) => {
                    tokio::time::sleep(pause).await;
                    let next_pause = (pause * 2).clamp(FIRST_PAUSE, Duration::from_secs(30));
                    match served_mcs_version(&client, mcs_kind).await {
                        Ok(Some(version)) => {
                            tracing::debug!(kind = mcs_kind, version, "watching");
                            let resource = mcs_resource(mcs_kind, version);
                            let api: Api<DynamicObject> = match &namespace {
                                Some(ns) => Api::namespaced_with(client, ns, &resource),
                                None => Api::all_with(client, &resource),
                            };
                            let watch = signals(kind, api, watcher::Config::default(), wrap);
                            Some((None, Step::Watch(watch)))
                        }
                        Ok(None) => {
                            Some((Some((kind, Signal::NotServed)), Step::Discover(next_pause)))
                        }
                        Err(e) => Some((
                            Some((
                                kind,
                                Signal::Failed(format!("discovery: {}", error_chain(&e))),
                            )),
                            Step::Discover(next_pause),
                        )),
                    }
                }
                Step::Watch(mut watch) => match watch.next().await {
                    // The version watched is gone: find out what is served now.
                    Some((k, Signal::NotServed)) => {
                        Some((Some((k, Signal::NotServed)), Step::Discover(FIRST_PAUSE)))
                    }
                    Some(signal) => Some((Some(signal), Step::Watch(watch))),
                    None => None,
                },
            }
        }
    })
    .filter_map(futures::future::ready)
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
    let mut write_back = source.write_back;
    let mut backoff = Duration::from_millis(500);
    let (answers_tx, answers) = mpsc::channel(16);
    let (client, url, writer_client) = loop {
        let built = match client_config(&config).await {
            Ok((c, url)) => {
                // The writer's requests do not count as the watches' answers.
                let writer = match &write_back {
                    Some(_) => Client::try_from(c.clone()).map(Some).map_err(Error::from),
                    None => Ok(None),
                };
                writer.and_then(|w| Ok((observed_client(c, answers_tx.clone())?, url, w)))
            }
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

    if let (Some(wb), Some(writer)) = (write_back.take(), writer_client) {
        tokio::spawn(crate::mcs::writer::run(
            config.cluster.clone(),
            writer,
            wb,
            state.subscribe(),
            shutdown.clone(),
        ));
    }

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
    // Exports are not filtered by the label selector: a ServiceExport
    // names its Service and carries no labels of it. Imports are read
    // whole: those of other implementations are left alone, not ignored.
    let exports = mcs_signals(
        Kind::Export,
        client.clone(),
        config.namespace.clone(),
        "ServiceExport",
        |o| Object::Export(Box::new(o)),
    );
    let imports = mcs_signals(
        Kind::Import,
        client.clone(),
        config.namespace.clone(),
        "ServiceImport",
        |o| Object::Import(Box::new(o)),
    );
    let dns = config.dns_configmap.as_ref().map(|(ns, name)| {
        let api: Api<core::ConfigMap> = Api::namespaced(client, ns);
        let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
        signals(Kind::Dns, api, wc, |o| Object::Dns(Box::new(o)))
    });
    let answered = tokio_stream::wrappers::ReceiverStream::new(answers)
        .map(|kind| (kind, Signal::Answered))
        .boxed();
    let mut stream = futures::stream::select_all([
        signals(Kind::Service, services, wc.clone(), |o| {
            Object::Service(Box::new(o))
        }),
        signals(Kind::Slice, slices, wc, |o| Object::Slice(Box::new(o))),
        signals(Kind::Node, nodes, watcher::Config::default(), |o| {
            Object::Node(Box::new(o))
        }),
        exports,
        imports,
        answered,
    ]);
    if let Some(dns) = dns {
        stream.push(dns);
    }

    let mut view = View::new(name.clone(), config.cluster.clone());
    let mut listing = [true; KINDS];
    let mut listed = [false; KINDS];
    // Without a ConfigMap to read, that kind is done.
    if config.dns_configmap.is_none() {
        listing[Kind::Dns as usize] = false;
        listed[Kind::Dns as usize] = true;
    }
    let mut errors: [Option<String>; KINDS] = Default::default();
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
                    view.start_list(kind);
                    if listed[i] {
                        tracing::info!(source = %name, kind = kind.name(), "relisting");
                    }
                }
                Signal::Listed(object) => {
                    // Nothing is published before the list is done.
                    view.listed(object);
                    continue;
                }
                Signal::InitDone => {
                    view.end_list(kind);
                    listing[i] = false;
                    listed[i] = true;
                    if errors[i].take().is_some() {
                        tracing::info!(source = %name, kind = kind.name(), api_server = %url, "watch recovered (relisted)");
                    }
                    dirty = true;
                }
                Signal::Applied(object) => {
                    view.apply(object);
                    recovered(&mut errors[i], &name, kind, &url);
                    dirty = true;
                }
                Signal::Deleted(object) => {
                    view.delete(&object);
                    recovered(&mut errors[i], &name, kind, &url);
                    dirty = true;
                }
                Signal::Failed(message) => {
                    tracing::warn!(source = %name, kind = kind.name(), api_server = %url, error = %message, "watch failed; retrying with backoff");
                    errors[i] = Some(format!("{} from {url}: {message}", kind.name()));
                }
                Signal::Answered => {
                    if !recovered(&mut errors[i], &name, kind, &url) {
                        // The usual case, a page or a watch answered: no news.
                        continue;
                    }
                }
                Signal::NotServed => {
                    // No MCS CRDs: nothing is exported, which is no failure.
                    // No kube-dns ConfigMap we may read: no cluster DNS settings.
                    if !listed[i] {
                        match kind {
                            Kind::Dns => {
                                tracing::info!(source = %name, "the kube-dns ConfigMap cannot be read (not allowed?); the agents keep their own DNS settings")
                            }
                            _ => {
                                tracing::info!(source = %name, kind = kind.name(), "not served by the API server (MCS CRDs not installed?); nothing is exported from it")
                            }
                        }
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
        // The source is synced once Services, slices and Nodes are listed,
        // and the MCS kinds are listed, not served, or failing: exports and
        // the ServiceImport record (the ClusterSet IPs every replica
        // honours) are in the first state published, so a replica that
        // starts never publishes an address it takes back a moment later;
        // an MCS API that cannot be read holds nothing else back.
        let mcs_done = [Kind::Export, Kind::Import]
            .iter()
            .all(|k| listed[*k as usize] || errors[*k as usize].is_some());
        let synced = listed[..3].iter().all(|l| *l) && mcs_done;
        // Publish objects only when every kind holds a complete list: never
        // a partial initial list, never in the middle of a relist.
        let relisting_optional = (3..KINDS).any(|k| listed[k] && listing[k]);
        if dirty && synced && !listing[..3].iter().any(|l| *l) && !relisting_optional {
            dirty = false;
            let mut new = view.state();
            new.last_error = last_error;
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

/// A ServiceImport as the record of its ClusterSet IPs.
fn recorded_import(import: &DynamicObject) -> super::RecordedImport {
    super::RecordedImport {
        namespace: import.namespace().unwrap_or_default(),
        name: import.name_any(),
        ips: import
            .data
            .pointer("/spec/ips")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect(),
        ours: import
            .labels()
            .get(crate::mcs::MANAGED_BY.0)
            .map(String::as_str)
            == Some(crate::mcs::MANAGED_BY.1),
    }
}

/// Clears a kind's error once its watch answers again, and says so.
/// Whether there was one.
fn recovered(error: &mut Option<String>, source: &str, kind: Kind, url: &str) -> bool {
    let was = error.take().is_some();
    if was {
        tracing::info!(%source, kind = kind.name(), api_server = %url, "watch recovered");
    }
    was
}

/// An object's namespace and name: how the API server names it.
type ObjectKey = (String, String);

fn object_key<K: Resource>(o: &K) -> ObjectKey {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// A converted object, remembered with the resourceVersion it came from.
#[derive(Debug)]
struct Converted<T> {
    resource_version: String,
    value: Result<T, Vec<ObjectError>>,
}

/// Everything the watchers told, converted as it arrives: each event
/// changes the persistent maps the source publishes in one place, so a
/// publication costs what changed since the last one, not the cluster.
/// Only a relist (rare: a 410 Gone, a restart) walks a whole kind.
struct View {
    source: String,
    cluster: String,
    /// Conversions by object, with the resourceVersion they came from: an
    /// event that brings the same version again converts nothing.
    service_cache: HashMap<ObjectKey, Converted<Arc<SourceService>>>,
    slice_cache: HashMap<ObjectKey, Converted<Option<Arc<SourceSlice>>>>,
    /// What is published: the converted objects that converted.
    services: Objects<SourceService>,
    slices: Objects<SourceSlice>,
    /// Objects that did not convert, by kind and object.
    failed: BTreeMap<(u8, ObjectKey), Vec<ObjectError>>,
    /// `failed` as published, made again only when it changed.
    errors: Vec<ObjectError>,
    errors_stale: bool,
    nodes: BTreeMap<String, NodeInfo>,
    node_list: Arc<[NodeInfo]>,
    nodes_stale: bool,
    exports: BTreeMap<ObjectKey, Export>,
    export_list: Vec<Export>,
    exports_stale: bool,
    imports: BTreeMap<ObjectKey, super::RecordedImport>,
    import_list: Vec<super::RecordedImport>,
    imports_stale: bool,
    /// The cluster's DNS settings, from the kube-dns ConfigMap.
    dns: Option<Arc<super::ClusterDns>>,
    /// The objects of each kind's relist in progress, Services and slices
    /// already converted: the API objects of a list of 100,000 slices
    /// held until its end were most of the memory at ready (1.27 GiB).
    listing: [Option<Vec<Listed>>; KINDS],
}

/// One object of a relist in progress.
#[derive(Debug)]
enum Listed {
    /// A Service's conversion; `None`: listed at the version converted.
    Service(ObjectKey, Option<Converted<Arc<SourceService>>>),
    /// A slice's conversion; `None`: listed at the version converted.
    Slice(ObjectKey, Option<Converted<Option<Arc<SourceSlice>>>>),
    /// An object of another kind, as listed (those are few).
    Other(Object),
}

impl Listed {
    fn key(&self) -> ObjectKey {
        match self {
            Listed::Service(key, _) | Listed::Slice(key, _) => key.clone(),
            Listed::Other(object) => object.key(),
        }
    }
}

impl View {
    fn new(source: String, cluster: String) -> Self {
        Self {
            source,
            cluster,
            service_cache: HashMap::new(),
            slice_cache: HashMap::new(),
            services: Objects::default(),
            slices: Objects::default(),
            failed: BTreeMap::new(),
            errors: Vec::new(),
            errors_stale: false,
            nodes: BTreeMap::new(),
            node_list: Arc::default(),
            nodes_stale: false,
            exports: BTreeMap::new(),
            export_list: Vec::new(),
            exports_stale: false,
            imports: BTreeMap::new(),
            import_list: Vec::new(),
            imports_stale: false,
            dns: None,
            listing: Default::default(),
        }
    }

    /// A relist of `kind` begins: its objects are gathered until it ends.
    fn start_list(&mut self, kind: Kind) {
        self.listing[kind as usize] = Some(Vec::new());
    }

    /// One object of a relist in progress: converted now, applied when
    /// the list ends.
    fn listed(&mut self, object: Object) {
        let kind = object.kind();
        if self.listing[kind as usize].is_none() {
            return;
        }
        let listed = match object {
            Object::Service(svc) => {
                let (key, converted) = self.convert_service(&svc);
                Listed::Service(key, converted)
            }
            Object::Slice(slice) => {
                let (key, converted) = self.convert_slice(&slice);
                Listed::Slice(key, converted)
            }
            other => Listed::Other(other),
        };
        if let Some(list) = &mut self.listing[kind as usize] {
            list.push(listed);
        }
    }

    /// A relist of `kind` ended: its objects replace the kind's, and what
    /// it no longer holds is deleted. Objects listed at the version they
    /// had convert nothing and change nothing.
    fn end_list(&mut self, kind: Kind) {
        let Some(list) = self.listing[kind as usize].take() else {
            return;
        };
        let listed: HashSet<ObjectKey> = list.iter().map(Listed::key).collect();
        let gone: Vec<ObjectKey> = match kind {
            Kind::Service => self.service_cache.keys().cloned().collect(),
            Kind::Slice => self.slice_cache.keys().cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
            Kind::Export => self.exports.keys().cloned().collect(),
            Kind::Import => self.imports.keys().cloned().collect(),
            // One object at most: a list without it removes it.
            Kind::Dns => vec![(String::new(), String::new())],
        };
        for key in gone.into_iter().filter(|k| !listed.contains(k)) {
            self.remove(kind, &key);
        }
        for object in list {
            match object {
                Listed::Service(key, Some(converted)) => self.apply_service(key, converted),
                Listed::Slice(key, Some(converted)) => self.apply_slice(key, converted),
                Listed::Service(_, None) | Listed::Slice(_, None) => {}
                Listed::Other(object) => self.apply(object),
            }
        }
    }

    /// A Service's key and conversion, `None` when the one cached came
    /// from the same resourceVersion.
    fn convert_service(
        &self,
        svc: &core::Service,
    ) -> (ObjectKey, Option<Converted<Arc<SourceService>>>) {
        let (cluster, source) = (self.cluster.as_str(), self.source.as_str());
        let key = object_key(svc);
        let converted = convert(&self.service_cache, &key, svc, |svc| {
            k8s::service(cluster, svc)
                .and_then(|s| k8s::validate_unallocated(&s).map(|()| Arc::new(s)))
                .map_err(|e| object_errors(source, e))
        });
        (key, converted)
    }

    /// A slice's key and conversion, `None` when the one cached came from
    /// the same resourceVersion.
    fn convert_slice(
        &self,
        slice: &discovery::EndpointSlice,
    ) -> (ObjectKey, Option<Converted<Option<Arc<SourceSlice>>>>) {
        let (cluster, source) = (self.cluster.as_str(), self.source.as_str());
        let key = object_key(slice);
        let converted = convert(&self.slice_cache, &key, slice, |slice| {
            k8s::endpoint_slice(cluster, slice)
                .map(|s| s.map(Arc::new))
                .map_err(|e| object_errors(source, e))
        });
        (key, converted)
    }

    /// A Service's new conversion replaces the one under `key`.
    fn apply_service(&mut self, key: ObjectKey, mut converted: Converted<Arc<SourceService>>) {
        let old = self.service_cache.remove(&key);
        match (old.map(|o| o.value), &mut converted.value) {
            // Equal after conversion (a status or an annotation we
            // do not read changed): the same `Arc`, no change.
            (Some(Ok(old)), Ok(new)) if old == *new => *new = old,
            (old, new) => {
                if let Some(Ok(old)) = old {
                    self.services.remove(&old.key);
                }
                if let Ok(new) = new {
                    self.services.push(new.clone());
                }
            }
        }
        set_failed(
            &mut self.failed,
            &mut self.errors_stale,
            Kind::Service,
            &key,
            &converted.value,
        );
        self.service_cache.insert(key, converted);
    }

    /// A slice's new conversion replaces the one under `key`.
    fn apply_slice(&mut self, key: ObjectKey, mut converted: Converted<Option<Arc<SourceSlice>>>) {
        let old = self.slice_cache.remove(&key);
        match (old.map(|o| o.value), &mut converted.value) {
            (Some(Ok(Some(old))), Ok(Some(new))) if old == *new => *new = old,
            (old, new) => {
                // The old key first: a changed service-name label
                // moves the slice to another Service.
                if let Some(Ok(Some(old))) = old {
                    self.slices.remove(&old.key());
                }
                if let Ok(Some(new)) = new {
                    self.slices.push(new.clone());
                }
            }
        }
        set_failed(
            &mut self.failed,
            &mut self.errors_stale,
            Kind::Slice,
            &key,
            &converted.value,
        );
        self.slice_cache.insert(key, converted);
    }

    /// An object added or changed.
    fn apply(&mut self, object: Object) {
        let cluster = self.cluster.as_str();
        let source = self.source.as_str();
        match object {
            Object::Service(svc) => {
                if let (key, Some(converted)) = self.convert_service(&svc) {
                    self.apply_service(key, converted);
                }
            }
            Object::Slice(slice) => {
                if let (key, Some(converted)) = self.convert_slice(&slice) {
                    self.apply_slice(key, converted);
                }
            }
            Object::Node(node) => {
                let info = NodeInfo {
                    name: node.name_any(),
                    zone: node.labels().get(ZONE_LABEL).cloned(),
                    draining: node_draining(&node),
                };
                if self.nodes.get(&info.name) != Some(&info) {
                    self.nodes.insert(info.name.clone(), info);
                    self.nodes_stale = true;
                }
            }
            Object::Export(export) => {
                let key = object_key(&*export);
                let new = Export {
                    // The source's cluster, as for Services: kube sources
                    // never honour the cluster annotation.
                    key: ServiceKey::new(
                        cluster.to_owned(),
                        export.namespace().unwrap_or_else(|| "default".into()),
                        export.name_any(),
                    ),
                    created_unix: export.creation_timestamp().map(|t| t.0.as_second()),
                    exported: super::ExportedMeta::of(&export.data),
                };
                if self.exports.get(&key) != Some(&new) {
                    self.exports.insert(key, new);
                    self.exports_stale = true;
                }
            }
            Object::Import(import) => {
                let key = object_key(&*import);
                let new = recorded_import(&import);
                if self.imports.get(&key) != Some(&new) {
                    self.imports.insert(key, new);
                    self.imports_stale = true;
                }
            }
            Object::Dns(cm) => {
                let (dns, problems) = k8s::cluster_dns(&cm);
                let object = format!(
                    "ConfigMap {}/{}",
                    cm.namespace().unwrap_or_default(),
                    cm.name_any()
                );
                let value: Result<(), Vec<ObjectError>> = if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems
                        .into_iter()
                        .map(|(field, message)| ObjectError {
                            source: source.to_owned(),
                            object: object.clone(),
                            field,
                            message,
                        })
                        .collect())
                };
                set_failed(
                    &mut self.failed,
                    &mut self.errors_stale,
                    Kind::Dns,
                    &(String::new(), String::new()),
                    &value,
                );
                let dns = (dns != super::ClusterDns::default()).then(|| Arc::new(dns));
                if self.dns != dns {
                    self.dns = dns;
                }
            }
        }
    }

    /// An object deleted.
    fn delete(&mut self, object: &Object) {
        self.remove(object.kind(), &object.key());
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Service => {
                if let Some(Converted { value: Ok(s), .. }) = self.service_cache.remove(key) {
                    self.services.remove(&s.key);
                }
            }
            Kind::Slice => {
                if let Some(Converted {
                    value: Ok(Some(s)), ..
                }) = self.slice_cache.remove(key)
                {
                    self.slices.remove(&s.key());
                }
            }
            Kind::Node => {
                self.nodes_stale |= self.nodes.remove(&key.1).is_some();
            }
            Kind::Export => {
                self.exports_stale |= self.exports.remove(key).is_some();
            }
            Kind::Import => {
                self.imports_stale |= self.imports.remove(key).is_some();
            }
            Kind::Dns => self.dns = None,
        }
        if self.failed.remove(&(kind as u8, key.clone())).is_some() {
            self.errors_stale = true;
        }
    }

    /// The state to publish: the persistent maps as they stand (a pointer
    /// copy each), and the lists of errors, Nodes and exports, made again
    /// only when they changed.
    fn state(&mut self) -> SourceState {
        if std::mem::take(&mut self.errors_stale) {
            self.errors = self.failed.values().flatten().cloned().collect();
            self.errors
                .sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
        }
        if std::mem::take(&mut self.nodes_stale) {
            self.node_list = self.nodes.values().cloned().collect();
        }
        if std::mem::take(&mut self.exports_stale) {
            self.export_list = self.exports.values().cloned().collect();
            self.export_list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        if std::mem::take(&mut self.imports_stale) {
            self.import_list = self.imports.values().cloned().collect();
        }
        SourceState {
            synced: true,
            services: self.services.clone(),
            slices: self.slices.clone(),
            errors: self.errors.clone(),
            nodes: self.node_list.clone(),
            exports: self.export_list.clone(),
            service_imports: self.import_list.clone(),
            dns: self.dns.clone(),
            ..SourceState::default()
        }
    }
}

impl Object {
    fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Slice(_) => Kind::Slice,
            Object::Node(_) => Kind::Node,
            Object::Export(_) => Kind::Export,
            Object::Dns(_) => Kind::Dns,
            Object::Import(_) => Kind::Import,
        }
    }

    /// Its namespace and name; a Node's namespace is empty.
    fn key(&self) -> ObjectKey {
        match self {
            Object::Service(o) => object_key(&**o),
            Object::Slice(o) => object_key(&**o),
            Object::Node(o) => (String::new(), o.name_any()),
            Object::Export(o) | Object::Import(o) => object_key(&**o),
            // The one ConfigMap watched.
            Object::Dns(_) => (String::new(), String::new()),
        }
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

/// Records in `failed` whether the object under `key` failed to convert;
/// `stale` once that changed.
fn set_failed<T>(
    failed: &mut BTreeMap<(u8, ObjectKey), Vec<ObjectError>>,
    stale: &mut bool,
    kind: Kind,
    key: &ObjectKey,
    value: &Result<T, Vec<ObjectError>>,
) {
    let k = (kind as u8, key.clone());
    match value {
        Ok(_) => *stale |= failed.remove(&k).is_some(),
        Err(e) => {
            if failed.get(&k) != Some(e) {
                failed.insert(k, e.clone());
                *stale = true;
            }
        }
    }
}

/// The conversion of `object`, unless the one cached under `key` came from
/// the same resourceVersion (then `None`: nothing changed).
fn convert<K: Resource, T>(
    cache: &HashMap<ObjectKey, Converted<T>>,
    key: &ObjectKey,
    object: &K,
    f: impl FnOnce(&K) -> Result<T, Vec<ObjectError>>,
) -> Option<Converted<T>> {
    let rv = object.resource_version().unwrap_or_default();
    if cache
        .get(key)
        .is_some_and(|c| !rv.is_empty() && c.resource_version == rv)
    {
        return None;
    }
    Some(Converted {
        value: f(object),
        resource_version: rv,
    })
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(name: &str, rv: &str, port: u16) -> Object {
        Object::Service(Box::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": name, "resourceVersion": rv},
                "spec": {"ports": [{"name": "http", "port": port, "targetPort": 8080}]},
            }))
            .expect("a Service"),
        ))
    }

    fn slice(name: &str, service: &str, rv: &str, ips: &[&str]) -> Object {
        let endpoints: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        Object::Slice(Box::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": name, "resourceVersion": rv,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .expect("an EndpointSlice"),
        ))
    }

    fn node(name: &str, zone: &str) -> Object {
        Object::Node(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {ZONE_LABEL: zone}},
            }))
            .expect("a Node"),
        ))
    }

    fn view() -> View {
        View::new("kube".into(), "c1".into())
    }

    /// A view that took `objects` as one list of each kind, from nothing.
    fn listed(objects: Vec<Object>) -> SourceState {
        let mut v = view();
        for kind in [
            Kind::Service,
            Kind::Slice,
            Kind::Node,
            Kind::Export,
            Kind::Import,
        ] {
            v.start_list(kind);
        }
        for o in objects {
            v.listed(o);
        }
        for kind in [
            Kind::Service,
            Kind::Slice,
            Kind::Node,
            Kind::Export,
            Kind::Import,
        ] {
            v.end_list(kind);
        }
        v.state()
    }

    fn slice_services(state: &SourceState) -> Vec<(String, String)> {
        state
            .slices
            .iter()
            .map(|s| (s.service.name.clone(), s.slice.name.clone()))
            .collect()
    }

    #[test]
    fn events_applied_one_by_one_equal_a_fresh_list_of_the_result() {
        let mut v = view();
        v.start_list(Kind::Service);
        v.listed(service("a", "1", 80));
        v.listed(service("b", "2", 80));
        v.end_list(Kind::Service);
        v.apply(slice("a-1", "a", "3", &["10.0.0.1"]));
        v.apply(slice("b-1", "b", "4", &["10.0.0.2"]));
        v.apply(node("n1", "z1"));
        let before = v.state();

        // An endpoint moves, a Service changes its port, one is deleted,
        // a slice is relabelled to another Service, a Node is added.
        v.apply(slice("a-1", "a", "5", &["10.0.0.9"]));
        v.apply(service("b", "6", 81));
        v.apply(service("c", "7", 80));
        v.delete(&service("a", "1", 80));
        v.apply(slice("b-1", "c", "8", &["10.0.0.2"]));
        v.apply(node("n2", "z2"));
        let after = v.state();

        let fresh = listed(vec![
            service("b", "6", 81),
            service("c", "7", 80),
            slice("a-1", "a", "5", &["10.0.0.9"]),
            slice("b-1", "c", "8", &["10.0.0.2"]),
            node("n1", "z1"),
            node("n2", "z2"),
        ]);
        assert_eq!(after, fresh);
        assert_eq!(
            slice_services(&after),
            [("a".into(), "a-1".into()), ("c".into(), "b-1".into())],
            "the relabelled slice left Service b"
        );
        // Derived from the state before: the diff names what changed only.
        let changed: Vec<_> = before
            .services
            .changed_keys(&after.services)
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(changed, ["a", "b", "c"]);
    }

    #[test]
    fn a_node_drains_while_deleted_or_tainted_by_the_autoscaler() {
        let node = |extra: Value| -> core::Node {
            let mut doc = json!({"metadata": {"name": "n1"}});
            if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    d.insert(k.clone(), v.clone());
                }
            }
            serde_json::from_value(doc).expect("a Node")
        };
        assert_eq!(node_draining(&node(json!({}))), None);
        let other_taint = json!({"spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}});
        assert_eq!(node_draining(&node(other_taint)), None);
        let autoscaler = json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1733500000", "effect": "NoSchedule"}]}});
        assert_eq!(
            node_draining(&node(autoscaler)).as_deref(),
            Some("ToBeDeletedByClusterAutoscaler")
        );
        let deleted =
            json!({"metadata": {"name": "n1", "deletionTimestamp": "2026-12-06T19:00:00Z"}});
        assert_eq!(node_draining(&node(deleted)).as_deref(), Some("deleted"));
    }

    #[test]
    fn an_object_that_converts_alike_keeps_its_arc_and_an_old_version_converts_nothing() {
        let mut v = view();
        v.apply(service("a", "1", 80));
        v.apply(slice("a-1", "a", "2", &["10.0.0.1"]));
        let before = v.state();
        // A new resourceVersion, the same content (a status changed).
        v.apply(service("a", "3", 80));
        v.apply(slice("a-1", "a", "4", &["10.0.0.1"]));
        let after = v.state();
        assert!(after.services.same(&before.services), "services changed");
        assert!(after.slices.same(&before.slices), "slices changed");
        // The same resourceVersion again with other content is not
        // converted again (the API server never does that; the cache is
        // what keeps a relist cheap).
        v.apply(service("a", "3", 99));
        assert!(v.state().services.same(&before.services));
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_holds_and_errors_follow_their_objects() {
        let mut v = view();
        v.apply(service("a", "1", 80));
        v.apply(service("b", "2", 80));
        // Port 0 does not convert: skipped and reported, by object and field.
        v.apply(service("bad", "3", 0));
        let state = v.state();
        assert_eq!(state.services.len(), 2);
        assert_eq!(state.errors.len(), 1, "{:?}", state.errors);
        assert!(
            state.errors[0].object.contains("ns/bad"),
            "{:?}",
            state.errors[0]
        );

        v.start_list(Kind::Service);
        v.listed(service("b", "2", 80));
        v.listed(service("bad", "4", 80));
        // Until the list ends, the view holds what it had.
        assert_eq!(v.state().services.len(), 2);
        v.end_list(Kind::Service);
        let state = v.state();
        let names: Vec<_> = state.services.iter().map(|s| s.key.name.clone()).collect();
        assert_eq!(names, ["b", "bad"]);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
    }
}
