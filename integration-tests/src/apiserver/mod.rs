//! A Kubernetes API server stand-in, faithful at the protocol level for
//! Services, EndpointSlices (discovery.k8s.io/v1), Nodes, the kube-dns
//! ConfigMap and the MCS API's ServiceExports and ServiceImports (served in
//! `v1beta1` and `v1alpha1` without conversion, or `v1alpha1` only, each
//! with a `/status` subresource whose writes touch status only and a main
//! resource whose writes never do), so that the unmodified kube client (and
//! kubectl) can list, watch and write them. No kube-apiserver runs on the
//! machines the tests run on; `tests/apiserver.rs` checks these semantics
//! through the kube client itself, and the `fake_apiserver` binary runs it
//! by hand (`--load` manifests, `--kubeconfig-out`).
//!
//! ```text
//!  kube watcher / kubectl ──HTTP/1.1──▶ axum fallback ─▶ route(path) ─┬─ discovery documents
//!                                                                     ├─ list (selectors, limit/continue; a page walks only its own objects)
//!                                                                     ├─ get/create/put/patch/delete ─▶ Store
//!                                                                     └─ watch: NDJSON stream ◀─ Store broadcast
//!  test hooks: compact(), drop_watches(), fail_next(Fault), request counters, served() (pages and watches, timed),
//!             stop() returning the Store so a new server on the same port serves the same objects (a restart)
//! ```
//!
//! What it implements (and what it does not):
//! - one global decimal `resourceVersion`, `uid`, `creationTimestamp`,
//!   `generation`; PUT with a stale `resourceVersion` is a 409;
//! - lists honour `labelSelector`, `fieldSelector` (metadata.name and
//!   metadata.namespace), `limit` and `continue` (a continue token older than
//!   the compaction point is a 410), and always serve the latest state;
//! - watches: `resourceVersion` unset or `0` starts with synthetic ADDED
//!   events for the current state; `N` replays the log after `N`; `N` older
//!   than the compaction point yields one ERROR event with code 410 inside an
//!   HTTP 200 stream; `allowWatchBookmarks` gives periodic BOOKMARKs;
//!   `sendInitialEvents=true` ends the initial ADDED events with a BOOKMARK
//!   annotated `k8s.io/initial-events-end`; the stream closes at
//!   `timeoutSeconds`; a watcher that falls too far behind is disconnected;
//! - PATCH: merge patch and JSON patch; a strategic merge patch is applied
//!   as a merge patch (lists replaced whole); server-side apply as
//!   [`apply`] describes (`metadata.managedFields` recorded on every write,
//!   a 409 naming the owner when an apply changes another manager's field
//!   unless forced, fields a manager stops applying removed);
//! - errors are `Status` objects;
//! - objects are checked against the k8s-openapi types only, not against the
//!   API's validation rules, so tests can store objects a real API server
//!   would reject;
//! - no authentication, no admission, no OpenAPI documents (run kubectl
//!   writes with `--validate=false`), no Table output (kubectl prints client-side).

pub mod apply;
pub mod patch;
pub mod select;
pub mod store;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use select::Selector;
pub use store::{ApiError, Kind, Store};

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Serve the MCS API's ServiceExports and ServiceImports, as a cluster
    /// with the MCS CRDs installed does (a 404 for them otherwise).
    pub mcs: bool,
    /// Serve them in `v1beta1` too (the storage version, preferred), not
    /// only in `v1alpha1` (a cluster with the CRDs of MCS API v0.1).
    pub mcs_v1beta1: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            mcs: true,
            mcs_v1beta1: true,
        }
    }
}

/// An error to inject: the next `times` requests whose method matches (any,
/// if `None`) and whose path and query contain `contains` get `code`.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Method to match, or any.
    pub method: Option<Method>,
    /// Substring of `path?query` to match.
    pub contains: String,
    /// HTTP status to answer with (a `Status` body).
    pub code: u16,
    /// How many requests to fail.
    pub times: usize,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    config: ServerConfig,
    addr: SocketAddr,
    /// Bumped to end every open watch.
    watch_epoch: watch::Sender<u64>,
    /// Cancelled when the server stops: ends every watch, also one that a
    /// client opened between `drop_watches` and the listener closing (the
    /// graceful shutdown would wait for it until its timeoutSeconds).
    stopping: CancellationToken,
    faults: Mutex<Vec<Fault>>,
    /// Requests served, by `VERB plural` (`LIST services`, `WATCH nodes`,
    /// `GONE services` for a 410 sent on a watch), for tests that count.
    requests: Mutex<HashMap<String, u64>>,
    /// Every list page and watch served, in order, for benches that tell
    /// the stand-in's time from its client's.
    served: Mutex<Vec<Served>>,
}

/// One list page or watch request the stand-in answered.
#[derive(Debug, Clone)]
pub struct Served {
    /// `LIST services`, `WATCH endpointslices`.
    pub request: String,
    /// When it arrived.
    pub at: std::time::Instant,
    /// How long the stand-in took to make the answer (a list page: select
    /// and serialize; a watch: set it up).
    pub took: Duration,
    /// Objects in a list page.
    pub items: usize,
    /// Bytes of a list page's body.
    pub bytes: usize,
}

/// A running stand-in.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts on `listener` with a fresh store.
    pub fn start(listener: TcpListener, config: ServerConfig) -> std::io::Result<Self> {
        Self::start_with(listener, Store::default(), config)
    }

    /// Binds `127.0.0.1:0` and starts with a fresh store.
    pub async fn start_local() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start(listener, ServerConfig::default())
    }

    /// Starts on `listener` serving `store` (a restart keeps the store).
    pub fn start_with(
        listener: TcpListener,
        store: Store,
        config: ServerConfig,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            store,
            config,
            addr,
            watch_epoch: watch::Sender::new(0),
            stopping: shutdown.clone(),
            faults: Mutex::default(),
            requests: Mutex::default(),
            served: Mutex::default(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!("API server stand-in failed: {e}");
            }
        });
        Ok(Self {
            shared,
            shutdown,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The object store (survives [`FakeApiServer::stop`]).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Forgets the event log: watches resuming from before now get 410.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Ends every open watch stream (clients resume from their last rv).
    pub fn drop_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Fails matching requests (see [`Fault`]).
    pub fn fail_next(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Forgets every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// How many requests matched `key` (`LIST services`, `WATCH nodes`,
    /// `GONE services`: 410s sent on watches, ...).
    pub fn requests(&self, key: &str) -> u64 {
        lock(&self.shared.requests).get(key).copied().unwrap_or(0)
    }

    /// Every list page and watch request answered so far, in order.
    pub fn served(&self) -> Vec<Served> {
        lock(&self.shared.served).clone()
    }

    /// Stops like a crashing server: every watch ends, the listener closes.
    /// Returns the store, to start again with [`FakeApiServer::start_with`].
    pub async fn stop(self) -> Store {
        self.drop_watches();
        self.shutdown.cancel();
        let _ = self.task.await;
        self.shared.store.clone()
    }

    /// Writes a kubeconfig whose one context (`standin`, also current)
    /// points at this server over plain HTTP.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        self.write_kubeconfig_named(path, DEFAULT_CONTEXT)
    }

    /// Writes a kubeconfig whose cluster, user and context (also current)
    /// are all named `context`, so that the kubeconfigs of stand-ins with
    /// different names merge (`KUBECONFIG=a:b`) without a clash.
    /// The file appears whole (written aside, then renamed), so whoever
    /// waits for it never reads half of it.
    pub fn write_kubeconfig_named(&self, path: &Path, context: &str) -> std::io::Result<()> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".tmp");
        std::fs::write(&aside, kubeconfig_named(&self.url(), context))?;
        std::fs::rename(&aside, path)
    }
}

/// The name of a stand-in's kubeconfig entries unless told another.
pub const DEFAULT_CONTEXT: &str = "standin";

/// A kubeconfig with one context `standin` (current) for `server`.
pub fn kubeconfig(server: &str) -> String {
    kubeconfig_named(server, DEFAULT_CONTEXT)
}

/// A kubeconfig for `server` whose one cluster, user and context (also
/// current) are named `name`. kubectl and kube-rs merge the files of
/// `KUBECONFIG` entry by entry, the first file's entry of a name winning:
/// entries named alike would make the second server unreachable.
pub fn kubeconfig_named(server: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n\
users:\n- name: {name}\n  user: {{}}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\n\
current-context: {name}\n"
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// What a URL path names.
#[derive(Debug)]
enum Target {
    Discovery(Value),
    Collection {
        kind: Kind,
        namespace: Option<String>,
        /// The group/version asked for (objects are served in it).
        version: String,
    },
    Item {
        kind: Kind,
        namespace: String,
        name: String,
        version: String,
        /// The `/status` subresource.
        status: bool,
    },
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    let path_and_query = uri
        .path_and_query()
        .map_or(uri.path().to_owned(), |p| p.to_string());
    if let Some(e) = s.take_fault(&method, &path_and_query) {
        return error_response(&e);
    }
    let target = match route(&s, uri.path()) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let manager = query
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| default_manager(&headers));
    match (target, method.clone()) {
        (Target::Discovery(doc), Method::GET) => json_response(200, &doc),
        (
            Target::Collection {
                kind,
                namespace,
                version,
            },
            Method::GET,
        ) if watching => {
            let request = format!("WATCH {}", kind.plural());
            s.count(&request);
            let at = std::time::Instant::now();
            let response = watch_response(&s, kind, namespace, version, &query);
            s.served(request, at, 0, 0);
            response
        }
        (
            Target::Collection {
                kind,
                namespace,
                version,
            },
            Method::GET,
        ) => {
            let request = format!("LIST {}", kind.plural());
            s.count(&request);
            let at = std::time::Instant::now();
            match list(&s, kind, namespace.as_deref(), &version, &query) {
                Ok(page) => {
                    let body = page.to_json();
                    s.served(request, at, page.items.len(), body.len());
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                        .into_response()
                }
                Err(e) => error_response(&e),
            }
        }
        (
            Target::Collection {
                kind,
                namespace,
                version,
            },
            Method::POST,
        ) => {
            s.count(&format!("CREATE {}", kind.plural()));
            let created = create(&s, kind, namespace.as_deref(), &body, &manager, &version);
            result(created.map(|o| render(&o, &version)), 201)
        }
        (
            Target::Item {
                kind,
                namespace,
                name,
                version,
                status,
            },
            m,
        ) => {
            let key = (kind, namespace, name);
            let scope = match (kind.has_status(), status) {
                (false, _) => apply::Scope::All,
                (true, false) => apply::Scope::Main,
                (true, true) => apply::Scope::Status,
            };
            let write = Write {
                key: &key,
                scope,
                manager: &manager,
                version: &version,
            };
            let r = match m {
                Method::GET => s
                    .store
                    .get(&key)
                    .map(|o| (*o).clone())
                    .ok_or_else(|| not_found(&key)),
                Method::PUT => put(&s, &write, &body),
                Method::PATCH => patch(&s, &write, &headers, &query, &body),
                Method::DELETE if !status => s.store.delete(&key).map(|o| (*o).clone()),
                _ => Err(method_not_allowed(&method)),
            };
            let sub = if status { "/status" } else { "" };
            s.count(&format!("{m} {}{sub}", kind.plural()));
            result(r.map(|o| render(&o, &version)), 200)
        }
        (_, m) => error_response(&method_not_allowed(&m)),
    }
}

/// One write to an object: which, through which part of the API, by whom.
struct Write<'a> {
    key: &'a store::ObjectKey,
    scope: apply::Scope,
    manager: &'a str,
    version: &'a str,
}

/// The field manager of a write that names none, as the API server derives
/// it from the client's user agent (`kubectl-client-side-apply`,
/// `kube`, ...): the agent's first word.
fn default_manager(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split(['/', ' ']).next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// `obj` as served in `version` (the MCS CRDs are served in two versions
/// with no conversion: only `apiVersion` differs).
fn render(obj: &Value, version: &str) -> Value {
    let mut out = obj.clone();
    if out.get("apiVersion").and_then(Value::as_str) != Some(version) && out.get("kind").is_some() {
        out["apiVersion"] = json!(version);
    }
    out
}

impl Shared {
    /// The MCS API versions served, the preferred one first.
    fn mcs_versions(&self) -> Vec<&'static str> {
        match (self.config.mcs, self.config.mcs_v1beta1) {
            (false, _) => Vec::new(),
            (true, true) => store::MCS_VERSIONS.to_vec(),
            (true, false) => vec![store::MCS_VERSIONS[1]],
        }
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<ApiError> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.times > 0
                && f.method.as_ref().is_none_or(|m| m == method)
                && path.contains(&f.contains)
        })?;
        faults[i].times -= 1;
        let code = faults[i].code;
        faults.retain(|f| f.times > 0);
        Some(ApiError::new(code, "InternalError", "injected by the test"))
    }

    fn count(&self, key: &str) {
        *lock(&self.requests).entry(key.to_owned()).or_default() += 1;
    }

    fn served(&self, request: String, at: std::time::Instant, items: usize, bytes: usize) {
        lock(&self.served).push(Served {
            request,
            at,
            took: at.elapsed(),
            items,
            bytes,
        });
    }
}

fn result(r: Result<Value, ApiError>, code: u16) -> Response {
    match r {
        Ok(v) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

fn not_found(key: &store::ObjectKey) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} {:?} not found", key.0.plural(), key.2),
    )
}

fn method_not_allowed(m: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow {m} here"),
    )
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", message)
}

/// Splits `a=b&c=d` and percent-decodes (with `+` as space).
fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(s: &Shared, path: &str) -> Result<Target, ApiError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let unknown = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let mcs = s.mcs_versions();
    let (group_version, rest): (String, &[&str]) = match parts.as_slice() {
        ["version"] => return Ok(Target::Discovery(version())),
        ["api"] => return Ok(Target::Discovery(api_versions(s.addr))),
        ["apis"] => return Ok(Target::Discovery(api_groups(&mcs))),
        ["apis", "discovery.k8s.io"] => {
            return Ok(Target::Discovery(group(
                "discovery.k8s.io",
                &["discovery.k8s.io/v1"],
                true,
            )));
        }
        ["apis", "multicluster.x-k8s.io"] if !mcs.is_empty() => {
            return Ok(Target::Discovery(group(
                "multicluster.x-k8s.io",
                &mcs,
                true,
            )));
        }
        ["api", "v1"] => return Ok(Target::Discovery(resource_list("v1"))),
        ["apis", "discovery.k8s.io", "v1"] => {
            return Ok(Target::Discovery(resource_list("discovery.k8s.io/v1")));
        }
        ["apis", "multicluster.x-k8s.io", v]
            if mcs.contains(&format!("multicluster.x-k8s.io/{v}").as_str()) =>
        {
            return Ok(Target::Discovery(resource_list(&format!(
                "multicluster.x-k8s.io/{v}"
            ))));
        }
        ["api", "v1", rest @ ..] => ("v1".into(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(unknown()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some((*name).to_owned()), false),
        [plural, name, "status"] => (*plural, Some((*name).to_owned()), true),
        _ => return Err(unknown()),
    };
    let kind = Kind::from_path(&group_version, plural)
        .filter(|k| !k.mcs() || mcs.contains(&group_version.as_str()))
        .filter(|k| !status || k.has_status())
        .ok_or_else(unknown)?;
    if kind.namespaced() != namespace.is_some() && (name.is_some() || !kind.namespaced()) {
        return Err(unknown());
    }
    Ok(match name {
        None => Target::Collection {
            kind,
            namespace,
            version: group_version,
        },
        Some(name) => Target::Item {
            kind,
            namespace: namespace.unwrap_or_default(),
            name,
            version: group_version,
            status,
        },
    })
}

fn selectors(query: &HashMap<String, String>) -> Result<(Selector, Selector), ApiError> {
    let labels = Selector::labels(query.get("labelSelector").map_or("", String::as_str))
        .map_err(bad_request)?;
    let fields = Selector::fields(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(bad_request)?;
    Ok((labels, fields))
}

fn list(
    s: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    version: &str,
    query: &HashMap<String, String>,
) -> Result<ListPage, ApiError> {
    let (labels, fields) = selectors(query)?;
    let limit: usize = match query.get("limit").map(String::as_str) {
        None | Some("" | "0") => usize::MAX,
        Some(l) => l
            .parse()
            .map_err(|_| bad_request("limit is not a number"))?,
    };
    // A continue token is `rv/namespace/name` of the last item served, hex-encoded.
    let token = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(t) => {
            let raw = hex::decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad_request("continue token is malformed"))?;
            let mut it = raw.splitn(3, '/');
            match (
                it.next().and_then(|r| r.parse::<u64>().ok()),
                it.next(),
                it.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => Some((rv, ns.to_owned(), name.to_owned())),
                _ => return Err(bad_request("continue token is malformed")),
            }
        }
    };
    if let Some((rv, ..)) = &token
        && *rv < s.store.compacted()
    {
        return Err(ApiError::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
        ));
    }
    let page = s.store.list_page(
        kind,
        namespace,
        token.as_ref().map(|(_, ns, n)| (ns.as_str(), n.as_str())),
        limit,
        |obj| labels.matches_labels(obj) && fields.matches_fields(obj),
    );
    let rv = token.as_ref().map_or(page.rv, |t| t.0);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if page.more
        && let Some(last) = page.items.last()
    {
        let ns = last["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = last["metadata"]["name"].as_str().unwrap_or_default();
        metadata["continue"] = json!(hex::encode(format!("{rv}/{ns}/{name}")));
    }
    Ok(ListPage {
        kind,
        version: version.to_owned(),
        metadata,
        items: page.items,
    })
}

/// A list page to send.
struct ListPage {
    kind: Kind,
    version: String,
    metadata: Value,
    items: Vec<Arc<Value>>,
}

impl ListPage {
    /// The `…List` object, serialized: each object straight from the store
    /// (no copy unless it is served in another version than it is stored
    /// in), as the API server writes its list from its watch cache.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.items.len() * 1024);
        let head = json!({
            "kind": format!("{}List", self.kind.kind()),
            "apiVersion": self.version,
            "metadata": self.metadata,
        });
        // `{"kind":…,"metadata":{…}}` without its closing brace, then the items.
        let head = head.to_string();
        out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
        out.extend_from_slice(b",\"items\":[");
        for (i, obj) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let served_as_stored =
                obj.get("apiVersion").and_then(Value::as_str) == Some(self.version.as_str());
            // Writing to a Vec cannot fail, nor can serializing a Value.
            let _ = if served_as_stored {
                serde_json::to_writer(&mut out, &**obj)
            } else {
                serde_json::to_writer(&mut out, &render(obj, &self.version))
            };
        }
        out.extend_from_slice(b"]}");
        out
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    // kubectl sends JSON; YAML is accepted too (JSON is YAML).
    serde_json::from_slice(body)
        .or_else(|_| {
            std::str::from_utf8(body)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_saphyr::from_str::<Value>(t).map_err(|e| e.to_string()))
        })
        .map_err(|e| bad_request(format!("the body is not a JSON object: {e}")))
}

fn check_type(kind: Kind, obj: &Value) -> Result<(), ApiError> {
    if let Some(got) = obj.get("kind").and_then(Value::as_str)
        && got != kind.kind()
    {
        return Err(bad_request(format!(
            "kind {got:?} does not match {:?}",
            kind.kind()
        )));
    }
    if let Some(got) = obj.get("apiVersion").and_then(Value::as_str)
        && !kind.versions().contains(&got)
    {
        return Err(bad_request(format!(
            "apiVersion {got:?} does not match {:?}",
            kind.api_version()
        )));
    }
    Ok(())
}

fn create(
    s: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    body: &Bytes,
    manager: &str,
    version: &str,
) -> Result<Value, ApiError> {
    let mut obj = parse_body(body)?;
    check_type(kind, &obj)?;
    if kind.has_status()
        && let Some(m) = obj.as_object_mut()
    {
        // The status subresource's: a create sets none.
        m.remove("status");
    }
    let scope = if kind.has_status() {
        apply::Scope::Main
    } else {
        apply::Scope::All
    };
    apply::record_update(None, &mut obj, manager, scope, version);
    if let Some(ns) = namespace {
        match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(bad_request(format!(
                    "the namespace of the object ({given}) does not match the namespace on the request ({ns})"
                )));
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
    }
    s.store.create(kind, obj).map(|o| (*o).clone())
}

fn check_key(key: &store::ObjectKey, obj: &Value) -> Result<(), ApiError> {
    let got = store::key_of(key.0, obj)?;
    if got != *key {
        return Err(bad_request(
            "the name or namespace of the object does not match the request",
        ));
    }
    Ok(())
}

fn put(s: &Shared, w: &Write<'_>, body: &Bytes) -> Result<Value, ApiError> {
    let key = w.key;
    let mut obj = parse_body(body)?;
    check_type(key.0, &obj)?;
    if key.0.namespaced() && obj.pointer("/metadata/namespace").is_none() {
        obj["metadata"]["namespace"] = json!(key.1);
    }
    check_key(key, &obj)?;
    let current = s.store.get(key).ok_or_else(|| not_found(key))?;
    keep_other_part(&mut obj, &current, w.scope);
    apply::record_update(Some(&current), &mut obj, w.manager, w.scope, w.version);
    s.store.update(key.0, obj).map(|o| (*o).clone())
}

/// A write through one part of a kind with a status subresource changes
/// that part only: the main resource keeps the stored `status`, the
/// `/status` subresource everything but it (and the field owners, which
/// the write recorded).
fn keep_other_part(obj: &mut Value, current: &Value, scope: apply::Scope) {
    match scope {
        apply::Scope::All => {}
        apply::Scope::Main => match current.get("status") {
            Some(st) => obj["status"] = st.clone(),
            None => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
            }
        },
        apply::Scope::Status => {
            let status = obj.get("status").cloned();
            let rv = obj.pointer("/metadata/resourceVersion").cloned();
            let managed = obj.pointer("/metadata/managedFields").cloned();
            *obj = current.clone();
            if let Some(m) = managed {
                obj["metadata"]["managedFields"] = m;
            }
            match status {
                Some(st) => obj["status"] = st,
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            match rv {
                Some(rv) => obj["metadata"]["resourceVersion"] = rv,
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
            }
        }
    }
}

fn patch(
    s: &Shared,
    w: &Write<'_>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let key = w.key;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let p = parse_body(body)?;
    let content_type = content_type.split(';').next().unwrap_or_default().trim();
    if content_type == "application/apply-patch+yaml" {
        return server_side_apply(s, w, query, &p);
    }
    let current = s.store.get(key).ok_or_else(|| not_found(key))?;
    let mut obj = (*current).clone();
    match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            patch::merge(&mut obj, &p);
        }
        "application/json-patch+json" => {
            patch::json_patch(&mut obj, &p).map_err(|e| ApiError::new(422, "Invalid", e))?;
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the patch type {other:?} is not supported"),
            ));
        }
    }
    check_key(key, &obj)?;
    // A patch naming no resourceVersion applies to the latest object.
    if p.pointer("/metadata/resourceVersion").is_none()
        && let Some(m) = obj["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    keep_other_part(&mut obj, &current, w.scope);
    apply::record_update(Some(&current), &mut obj, w.manager, w.scope, w.version);
    s.store.update(key.0, obj).map(|o| (*o).clone())
}

/// Server-side apply (`application/apply-patch+yaml`): a `fieldManager`
/// is required; fields another manager owns with another value are a 409
/// unless `force=true`; an object that does not exist is created.
fn server_side_apply(
    s: &Shared,
    w: &Write<'_>,
    query: &HashMap<String, String>,
    applied: &Value,
) -> Result<Value, ApiError> {
    let key = w.key;
    if !query.contains_key("fieldManager") {
        return Err(bad_request(
            "PATCH with an apply patch requires a fieldManager parameter",
        ));
    }
    check_type(key.0, applied)?;
    let force = matches!(query.get("force").map(String::as_str), Some("true"));
    let current = s.store.get(key);
    if current.is_none() && w.scope == apply::Scope::Status {
        return Err(not_found(key));
    }
    let mut obj = apply::apply(
        current.as_deref(),
        applied,
        w.manager,
        force,
        w.scope,
        w.version,
    )
    .map_err(|conflicts| {
        let list: Vec<String> = conflicts
            .iter()
            .map(|c| format!("conflict with {:?}: {}", c.manager, c.field))
            .collect();
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict(s): {}",
                list.len(),
                list.join("; ")
            ),
        )
    })?;
    obj["metadata"]["name"] = json!(key.2);
    if key.0.namespaced() {
        obj["metadata"]["namespace"] = json!(key.1);
    }
    obj["kind"] = json!(key.0.kind());
    obj["apiVersion"] = json!(key.0.api_version());
    match current {
        Some(current) => {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            keep_other_part(&mut obj, &current, w.scope);
            s.store.update(key.0, obj).map(|o| (*o).clone())
        }
        None => {
            if key.0.has_status()
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("status");
            }
            s.store.create(key.0, obj).map(|o| (*o).clone())
        }
    }
}

fn watch_line(event: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": event, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch_response(
    s: &Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    version: String,
    query: &HashMap<String, String>,
) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(sel) => sel,
        Err(e) => return error_response(&e),
    };
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("1" | "true"));
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let from = match rv {
        "" | "0" => None,
        n => match n.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return error_response(&bad_request("resourceVersion is not a number")),
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let matches = move |obj: &Value| {
        namespace
            .as_deref()
            .is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns))
            && labels.matches_labels(obj)
            && fields.matches_fields(obj)
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let subscription = s.store.subscribe(
        kind,
        from.is_none() || send_initial,
        from.filter(|_| !send_initial),
    );
    let mut epoch = s.watch_epoch.subscribe();
    epoch.mark_unchanged();
    let interval = s.config.bookmark_interval;
    let shared = s.clone();
    tokio::spawn(async move {
        let mut sub = match subscription {
            Ok(sub) => sub,
            Err(e) => {
                shared.count(&format!("GONE {}", kind.plural()));
                let _ = tx.send(Ok(watch_line("ERROR", &e.status()))).await;
                return;
            }
        };
        // After drop_watches() nothing more is sent, not even what was queued.
        let gate = epoch.clone();
        let send = |line: Bytes| {
            let tx = tx.clone();
            let dropped = gate.has_changed().unwrap_or(true);
            async move { !dropped && tx.send(Ok(line)).await.is_ok() }
        };
        for obj in std::mem::take(&mut sub.objects) {
            if matches(&obj) && !send(watch_line("ADDED", &render(&obj, &version))).await {
                return;
            }
        }
        let mut progress = sub.rv;
        let bookmark = |rv: u64, initial_end: bool| {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            watch_line(
                "BOOKMARK",
                &json!({"kind": kind.kind(), "apiVersion": version, "metadata": meta}),
            )
        };
        if send_initial && !send(bookmark(progress, true)).await {
            return;
        }
        for change in std::mem::take(&mut sub.replay) {
            if let Some(line) = event_line(&change, &matches, &version)
                && !send(line).await
            {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticks = tokio::time::interval(interval);
        ticks.reset();
        loop {
            tokio::select! {
                biased;
                _ = epoch.changed() => return,
                _ = shared.stopping.cancelled() => return,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
                _ = ticks.tick(), if bookmarks => {
                    if !send(bookmark(progress, false)).await { return }
                }
                got = sub.events.recv() => match got {
                    Ok(change) => {
                        if change.rv <= progress { continue }
                        progress = change.rv;
                        if change.kind != kind { continue }
                        if let Some(line) = event_line(&change, &matches, &version) && !send(line).await {
                            return;
                        }
                    }
                    // Too slow a reader: close, as the API server does; the
                    // client resumes from its last resourceVersion.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The watch line for one change as a filtered watch sees it: an object
/// moving into the filter is ADDED, one moving out is DELETED.
fn event_line(
    change: &store::Change,
    matches: &impl Fn(&Value) -> bool,
    version: &str,
) -> Option<Bytes> {
    let was = change.old.as_deref().is_some_and(matches);
    let is = matches(&change.new);
    let event = match change.event {
        store::EventType::Added if is => "ADDED",
        store::EventType::Modified if was && is => "MODIFIED",
        store::EventType::Modified if is => "ADDED",
        store::EventType::Modified if was => "DELETED",
        store::EventType::Deleted if was => "DELETED",
        _ => return None,
    };
    Some(watch_line(event, &render(&change.new, version)))
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-switchyard-standin",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

/// An `APIGroup` document (with `kind`/`apiVersion` when it stands alone):
/// `versions` are group/versions, the preferred one first.
fn group(name: &str, versions: &[&str], alone: bool) -> Value {
    let v: Vec<Value> = versions
        .iter()
        .map(|gv| json!({"groupVersion": gv, "version": gv.rsplit('/').next().unwrap_or(gv)}))
        .collect();
    let mut g = json!({"name": name, "versions": v, "preferredVersion": v[0]});
    if alone {
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
    }
    g
}

fn api_groups(mcs: &[&str]) -> Value {
    let mut groups = vec![group("discovery.k8s.io", &["discovery.k8s.io/v1"], false)];
    if !mcs.is_empty() {
        groups.push(group("multicluster.x-k8s.io", mcs, false));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group_version: &str) -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut resources: Vec<Value> = Vec::new();
    for k in Kind::ALL
        .into_iter()
        .filter(|k| k.versions().contains(&group_version))
    {
        let short: &[&str] = match k {
            Kind::Service => &["svc"],
            Kind::Node => &["no"],
            Kind::EndpointSlice => &[],
            Kind::ServiceExport => &["svcex"],
            Kind::ConfigMap => &["cm"],
            Kind::ServiceImport => &["svcim"],
        };
        resources.push(json!({
            "name": k.plural(), "singularName": k.kind().to_lowercase(),
            "namespaced": k.namespaced(), "kind": k.kind(), "verbs": verbs,
            "shortNames": short,
            "categories": if k == Kind::Service { json!(["all"]) } else { json!([]) },
        }));
        if k.has_status() {
            resources.push(json!({
                "name": format!("{}/status", k.plural()), "singularName": "",
                "namespaced": k.namespaced(), "kind": k.kind(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let pairs = url_pairs("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=true&x");
        assert_eq!(
            pairs[0],
            ("labelSelector".into(), "app=web,tier in (a)".into())
        );
        assert_eq!(pairs[1], ("watch".into(), "true".into()));
        assert_eq!(pairs[2], ("x".into(), String::new()));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
