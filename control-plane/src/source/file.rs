//! The `file:PATH` source: Services and EndpointSlices from YAML manifests.
//!
//! Each PATH is a manifest file or a directory searched recursively for
//! `*.yaml`, `*.yml` and `*.json` files (hidden entries skipped, so the
//! `..data` links of a mounted ConfigMap are read once). A file holds
//! Kubernetes-shaped documents separated by `---`, or a `List`; only
//! `v1 Service`, `discovery.k8s.io/v1 EndpointSlice` and the MCS API's
//! `ServiceExport` (`multicluster.x-k8s.io/v1beta1` or `v1alpha1`) are used, other kinds
//! are ignored. With [`FileSource::with_cluster_annotation`]
//! (`--file-cluster-annotation`), the annotation `switchyard.io/cluster`
//! moves one object to another cluster than the source's; without it the
//! annotation is ignored (and logged), so whoever can write one file cannot
//! reach into another cluster's view unless the operator asked for it.
//!
//! ```text
//!   notify callback ─ relevant? ─▶ mpsc(1) ─▶ debounce ─▶ reload (blocking pool)
//!                                                          │ list files, hash each,
//!                                                          │ re-parse changed ones
//!                                                          ▼
//!                                 watch<SourceState> ◀─ publish if different
//! ```
//!
//! Failures stay local. A document that does not convert is skipped and
//! reported (as `Service ns/name`, or `PATH#N` for the N-th non-empty
//! document when it has no usable name); a file that is not valid YAML keeps
//! serving what it held before and is reported as a whole; when two files
//! define the same object, the first one in path order wins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard_model::{EndpointSlice, Service, ServiceKey, ValidationErrors};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::debounce::{Burst, Debounce};
use super::{Export, ObjectError, Source, SourceService, SourceSlice, SourceState};
use crate::k8s;

/// The annotation that puts one object in another cluster than the source's.
pub const CLUSTER_ANNOTATION: &str = "switchyard.io/cluster";

/// File name extensions read from directories.
const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Serves the Services and EndpointSlices of manifest files, reloading on change.
#[derive(Debug, Clone)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    cluster: String,
    debounce: Debounce,
    cluster_annotation: bool,
}

impl FileSource {
    /// A source reading `paths` (files or directories) for cluster `cluster`.
    /// A burst of changes coalesces into one reload (see [`Debounce`]).
    pub fn new(paths: Vec<PathBuf>, cluster: String, debounce: Debounce) -> Self {
        Self {
            paths,
            cluster,
            debounce,
            cluster_annotation: false,
        }
    }

    /// Honours the `switchyard.io/cluster` annotation: an object carrying it
    /// belongs to the cluster it names instead of the source's. Off by
    /// default (the annotation is then ignored and logged).
    pub fn with_cluster_annotation(mut self, honour: bool) -> Self {
        self.cluster_annotation = honour;
        self
    }
}

impl Source for FileSource {
    fn name(&self) -> String {
        let paths: Vec<_> = self.paths.iter().map(|p| p.display().to_string()).collect();
        format!("file:{}", paths.join(","))
    }

    fn cluster(&self) -> String {
        self.cluster.clone()
    }

    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(*self, state, shutdown))
    }
}

async fn run(source: FileSource, state: watch::Sender<SourceState>, shutdown: CancellationToken) {
    let name = source.name();
    // Events carry paths as the watched path was spelled, so make them
    // absolute once: a relative PATH would not match `./PATH` events.
    let paths: Vec<PathBuf> = source
        .paths
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();

    let (tx, mut events) = mpsc::channel::<()>(1);
    let filter = EventFilter {
        roots: paths.clone(),
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        match event {
            Ok(event) if !filter.is_relevant(&event) => return,
            Ok(_) => {}
            // Events may have been lost: a reload rescans everything.
            Err(e) => tracing::warn!(error = %e, "file watcher error"),
        }
        // A full channel already holds a pending reload; that one will see this change.
        let _ = tx.try_send(());
    });
    let (watcher, watcher_error) = match watcher {
        Ok(w) => (Some(w), None),
        Err(e) => {
            tracing::error!(source = %name, error = %e, "cannot watch files; serving the first read only");
            (None, Some(format!("cannot watch for changes: {e}")))
        }
    };
    let mut loader = Loader {
        source: name.clone(),
        paths,
        cluster: source.cluster,
        cluster_annotation: source.cluster_annotation,
        files: HashMap::new(),
        watcher,
        watched: BTreeMap::new(),
        watcher_error,
        complete_once: false,
        last: SourceState::default(),
    };

    loop {
        let reloaded = tokio::task::spawn_blocking(move || {
            let state = loader.reload();
            (loader, state)
        })
        .await;
        let new_state = match reloaded {
            Ok((l, s)) => {
                loader = l;
                s
            }
            Err(e) => {
                tracing::error!(source = %name, error = %e, "file reload failed; source stopped");
                return;
            }
        };
        super::publish(&state, &name, new_state);
        if !next_change(&mut events, source.debounce, &shutdown).await {
            return;
        }
    }
}

/// Waits for a relevant event, then for the burst it starts to end. Returns
/// false on shutdown.
async fn next_change(
    events: &mut mpsc::Receiver<()>,
    debounce: Debounce,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        got = events.recv() => if got.is_none() {
            // No watcher: nothing will ever change.
            shutdown.cancelled().await;
            return false;
        },
    }
    let mut burst = Burst::default();
    burst.change(debounce, Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = burst.ended() => return true,
            Some(()) = events.recv() => burst.change(debounce, Instant::now()),
        }
    }
}

/// The reload a `file:` source runs after every change, without a watcher
/// or a debounce: for benches that time one reload alone (the source
/// itself runs [`FileSource`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct Reloader(Loader);

impl Reloader {
    /// A reloader of `paths` for cluster `cluster`, named as a `file:` source.
    pub fn new(paths: Vec<PathBuf>, cluster: String) -> Self {
        let source = FileSource::new(paths, cluster, Debounce::NONE);
        Self(Loader {
            source: source.name(),
            paths: source.paths,
            cluster: source.cluster,
            cluster_annotation: false,
            files: HashMap::new(),
            watcher: None,
            watched: BTreeMap::new(),
            watcher_error: None,
            complete_once: false,
            last: SourceState::default(),
        })
    }

    /// Reads what changed and returns the whole new state.
    pub fn reload(&mut self) -> SourceState {
        self.0.reload()
    }
}

/// Decides, inside notify's callback, whether an event can change what we serve.
struct EventFilter {
    roots: Vec<PathBuf>,
}

impl EventFilter {
    fn is_relevant(&self, event: &Event) -> bool {
        if event.need_rescan() {
            return true;
        }
        if let EventKind::Access(kind) = event.kind {
            // Our own reads open and close files; only a finished write matters.
            return kind == AccessKind::Close(AccessMode::Write);
        }
        event.paths.iter().any(|p| self.concerns(p))
    }

    fn concerns(&self, path: &Path) -> bool {
        self.roots.iter().any(|root| {
            // A watched path itself, or a missing path's ancestor appearing.
            path == root
                || root.starts_with(path)
                // Inside a watched directory: a manifest, or something that may
                // be a directory (no extension, or a ConfigMap's `..data` link).
                || (path.starts_with(root)
                    && (is_manifest(path)
                        || path.extension().is_none()
                        || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".."))))
        })
    }
}

fn is_manifest(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        MANIFEST_EXTENSIONS
            .iter()
            .any(|m| m.eq_ignore_ascii_case(e))
    })
}

/// Everything the source knows between reloads. Lives on the blocking pool
/// while a reload runs.
struct Loader {
    source: String,
    paths: Vec<PathBuf>,
    cluster: String,
    cluster_annotation: bool,
    files: HashMap<PathBuf, LoadedFile>,
    watcher: Option<RecommendedWatcher>,
    /// Watched directories, with whether the watch is recursive.
    watched: BTreeMap<PathBuf, bool>,
    watcher_error: Option<String>,
    /// Set once every PATH has existed at one reload: until then the source
    /// is not synced, so the control plane stays not ready and publishes
    /// nothing rather than an empty view of a mistyped path.
    complete_once: bool,
    /// The last state returned, which the next one is derived from.
    last: SourceState,
}

impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("source", &self.source)
            .field("files", &self.files.len())
            .field("watched", &self.watched)
            .finish_non_exhaustive()
    }
}

/// One manifest file as last read.
#[derive(Debug)]
struct LoadedFile {
    /// SHA-256 of the content last read, parsable or not.
    digest: [u8; 32],
    /// What the last parsable content held.
    objects: FileObjects,
    /// Why the current content could not be used, if it could not.
    unreadable: Option<String>,
}

/// The objects and per-object errors of one file, in document order.
#[derive(Debug, Default)]
struct FileObjects {
    services: Vec<Located<Arc<SourceService>>>,
    slices: Vec<Located<Arc<SourceSlice>>>,
    exports: Vec<Located<Export>>,
    errors: Vec<ObjectError>,
    warnings: Vec<ObjectError>,
}

/// An object with the document it came from (`PATH#N`).
#[derive(Debug)]
struct Located<T> {
    at: String,
    value: T,
}

impl Loader {
    /// Brings the watches up to date, reads every file and returns the whole new state.
    ///
    /// A PATH that does not exist is never read as "no objects": before
    /// every PATH has existed once the state is not synced; after that, a
    /// PATH that disappears keeps serving the files it held (a volume
    /// unmounted or a directory moved is a mistake far more often than a
    /// way to delete every Service). Either way `last_error` names it.
    fn reload(&mut self) -> SourceState {
        let mut errors = Vec::new();
        // Watch before reading, so that a file written in between is not missed.
        self.update_watches(&mut errors);
        let (mut files, missing) = self.list_files(&mut errors);
        for path in &files {
            self.read_file(path);
        }
        // Files of a missing PATH stay as they were last read.
        let read: HashSet<PathBuf> = files.iter().cloned().collect();
        let mut kept: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !read.contains(*p) && missing.iter().any(|m| p.starts_with(m)))
            .cloned()
            .collect();
        kept.sort();
        files.extend(kept);
        let listed: HashSet<&PathBuf> = files.iter().collect();
        self.files.retain(|p, _| listed.contains(p));
        self.complete_once |= missing.is_empty();
        let mut state = self.assemble(&files, errors);
        state.synced = self.complete_once;
        if !missing.is_empty() {
            let paths: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            let held = if self.complete_once {
                "serving what it held before"
            } else {
                "nothing is published until it does"
            };
            state.last_error = Some(format!(
                "{} does not exist; watching for it to appear ({held})",
                paths.join(", ")
            ));
        }
        // Derived from the last state, the maps share what did not change,
        // and the index patches in a change of endpoints.
        super::share_unchanged(&self.last, &mut state);
        self.last = state.clone();
        state
    }

    fn error(
        &self,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ObjectError {
        ObjectError {
            source: self.source.clone(),
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn update_watches(&mut self, errors: &mut Vec<ObjectError>) {
        if let Some(message) = &self.watcher_error {
            errors.push(self.error("", "", message.clone()));
        }
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let mut wanted: BTreeMap<PathBuf, bool> = BTreeMap::new();
        for root in &self.paths {
            if root.is_dir() {
                wanted.insert(root.clone(), true);
            } else if let Some(dir) = root.ancestors().skip(1).find(|a| a.is_dir()) {
                // Editors replace a file by renaming over it, which a watch on
                // the file itself would not survive; its directory sees it.
                wanted.entry(dir.to_path_buf()).or_insert(false);
            }
        }
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(p, r)| wanted.get(*p) != Some(*r))
            .map(|(p, _)| p.clone())
            .collect();
        for path in stale {
            // The directory may be gone already, taking its watch with it.
            let _ = watcher.unwatch(&path);
            self.watched.remove(&path);
        }
        let mut failed = Vec::new();
        for (path, recursive) in wanted {
            if self.watched.contains_key(&path) {
                continue;
            }
            let mode = if recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match watcher.watch(&path, mode) {
                Ok(()) => {
                    self.watched.insert(path, recursive);
                }
                Err(e) => failed.push((path, e)),
            }
        }
        for (path, e) in failed {
            errors.push(self.error(path.display().to_string(), "", format!("cannot watch: {e}")));
        }
    }

    /// Every manifest file, in path order (a file named twice is listed
    /// once), and the PATHs that do not exist.
    fn list_files(&self, errors: &mut Vec<ObjectError>) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mut files = Vec::new();
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for root in &self.paths {
            let mut found = Vec::new();
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {
                    self.walk(root, &mut found, errors);
                    found.sort();
                }
                Ok(m) if m.is_file() => found.push(root.clone()),
                Ok(_) => errors.push(self.error(
                    root.display().to_string(),
                    "",
                    "not a file or a directory",
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(root.clone()),
                Err(e) => errors.push(self.error(root.display().to_string(), "", e.to_string())),
            }
            files.extend(found.into_iter().filter(|f| seen.insert(f.clone())));
        }
        (files, missing)
    }

    fn walk(&self, dir: &Path, found: &mut Vec<PathBuf>, errors: &mut Vec<ObjectError>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(self.error(dir.display().to_string(), "", e.to_string()));
                return;
            }
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                self.walk(&path, found, errors);
            } else if is_manifest(&path)
                // A symlink counts when it leads to a file; linked directories
                // are not followed, so there are no loops.
                && std::fs::metadata(&path).is_ok_and(|m| m.is_file())
            {
                found.push(path);
            }
        }
    }

    /// Reads one file and re-parses it if its content changed.
    fn read_file(&mut self, path: &Path) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            // Removed since it was listed: the next event will tell.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                let entry = self
                    .files
                    .entry(path.to_path_buf())
                    .or_insert_with(|| LoadedFile {
                        digest: [0; 32],
                        objects: FileObjects::default(),
                        unreadable: None,
                    });
                // Forget the digest so that the content is parsed once readable again.
                entry.digest = [0; 32];
                entry.unreadable = Some(format!("cannot read: {e}"));
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if self.files.get(path).is_some_and(|f| f.digest == digest) {
            return;
        }
        let parsed = Parser {
            source: &self.source,
            cluster: &self.cluster,
            cluster_annotation: self.cluster_annotation,
        }
        .file(path, &bytes);
        match parsed {
            Ok(objects) => {
                self.files.insert(
                    path.to_path_buf(),
                    LoadedFile {
                        digest,
                        objects,
                        unreadable: None,
                    },
                );
            }
            Err(message) => {
                tracing::warn!(path = %path.display(), %message, "keeping the previous content of a broken file");
                let entry = self
                    .files
                    .entry(path.to_path_buf())
                    .or_insert_with(|| LoadedFile {
                        digest,
                        objects: FileObjects::default(),
                        unreadable: None,
                    });
                entry.digest = digest;
                entry.unreadable = Some(message);
            }
        }
    }

    /// Merges the files in path order: the first definition of an object wins.
    fn assemble(&self, files: &[PathBuf], mut errors: Vec<ObjectError>) -> SourceState {
        let mut warnings = Vec::new();
        let mut services = super::Objects::default();
        let mut slices = super::Objects::default();
        let mut first_service: HashMap<&ServiceKey, &str> = HashMap::new();
        let mut first_slice: HashMap<(&str, &str, &str), &str> = HashMap::new();
        let mut exports: Vec<Export> = Vec::new();
        for path in files {
            let Some(file) = self.files.get(path) else {
                continue;
            };
            if let Some(message) = &file.unreadable {
                errors.push(self.error(path.display().to_string(), "", message.clone()));
            }
            errors.extend(file.objects.errors.iter().cloned());
            warnings.extend(file.objects.warnings.iter().cloned());
            for s in &file.objects.services {
                match first_service.get(&s.value.key) {
                    None => {
                        first_service.insert(&s.value.key, &s.at);
                        services.push(s.value.clone());
                    }
                    Some(first) => errors.push(self.error(
                        s.value.object_name(),
                        "",
                        format!("defined again in {}; the one in {first} is used", s.at),
                    )),
                }
            }
            for e in &file.objects.exports {
                if !exports.iter().any(|x| x.key == e.value.key) {
                    exports.push(e.value.clone());
                }
            }
            for s in &file.objects.slices {
                let key = (
                    s.value.service.cluster.as_str(),
                    s.value.service.namespace.as_str(),
                    s.value.slice.name.as_str(),
                );
                match first_slice.get(&key) {
                    None => {
                        first_slice.insert(key, &s.at);
                        slices.push(s.value.clone());
                    }
                    Some(first) => errors.push(self.error(
                        s.value.slice.object_name(&s.value.service),
                        "",
                        format!("defined again in {}; the one in {first} is used", s.at),
                    )),
                }
            }
        }
        SourceState {
            synced: true,
            services,
            slices,
            errors,
            exports,
            warnings,
            ..SourceState::default()
        }
    }
}

/// Most documents one file may hold (`---` separated). A `kubectl get -o
/// yaml` export of 50,000 Services and their EndpointSlices is 100,000
/// documents when split (`bench_file_limits` measures the export).
pub const MAX_DOCUMENTS: usize = 250_000;

/// Most YAML nodes (mappings, sequences, scalars) in one file: an export of
/// 50,000 Services and their slices, with the metadata and status kubectl
/// prints, has 10.9 million (`bench_file_limits`).
pub const MAX_NODES: usize = 25_000_000;

/// Most bytes of scalar text in one file (the same export: 85 MB, above
/// serde-saphyr's default of 64 MiB).
pub const MAX_SCALAR_BYTES: usize = 512 << 20;

/// The YAML loader's limits: far above what 50,000 Services need, still a
/// bound on what a hostile file can make the control plane allocate.
fn budget() -> serde_saphyr::Budget {
    let mut b = serde_saphyr::Budget::default();
    b.max_documents = MAX_DOCUMENTS;
    b.max_nodes = MAX_NODES;
    // Every node is one event, every collection one more at its end.
    b.max_events = 2 * MAX_NODES;
    b.max_total_scalar_bytes = MAX_SCALAR_BYTES;
    b
}

/// The documents of a YAML stream, or why not: a limit said as a limit.
fn parse_documents(text: &str, budget: serde_saphyr::Budget) -> Result<Vec<Value>, String> {
    let limits = (
        budget.max_documents,
        budget.max_nodes,
        budget.max_total_scalar_bytes,
    );
    let options = serde_saphyr::options! { with_snippet: false, budget: Some(budget) };
    serde_saphyr::from_multiple_with_options(text, options).map_err(|e| match e {
        serde_saphyr::Error::Budget { breach, .. } => limit_message(&breach, limits),
        e => format!("not valid YAML: {e}"),
    })
}

/// A limit the file broke, said as a limit, with what to do.
fn limit_message(
    breach: &serde_saphyr::budget::BudgetBreach,
    (documents_limit, nodes_limit, bytes_limit): (usize, usize, usize),
) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    let (what, limit) = match breach {
        B::Documents { documents } => (
            format!("{documents} documents"),
            documents_limit.to_string(),
        ),
        B::Nodes { nodes } => (format!("{nodes} YAML nodes"), nodes_limit.to_string()),
        B::Events { events } => (
            format!("{events} YAML events"),
            (2 * nodes_limit).to_string(),
        ),
        B::ScalarBytes { total_scalar_bytes } => (
            format!("{total_scalar_bytes} bytes of text"),
            format!("{bytes_limit} bytes"),
        ),
        other => return format!("a YAML loader limit was reached ({other:?}); split the file"),
    };
    format!(
        "the file has more than {what}; the limit is {limit} per file; split it into several files"
    )
}

/// serde's "invalid type: string \"80\", expected i32" as an operator
/// reads it: "expected an integer, got \"80\"".
fn type_error_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let Some(rest) = text.strip_prefix("invalid type: ") else {
        return text;
    };
    let Some((got, expected)) = rest.split_once(", expected ") else {
        return text;
    };
    let expected = match expected {
        "i32" | "i64" | "u16" | "u32" | "u64" => "an integer",
        "a string" | "string" => "a string",
        "a boolean" | "bool" => "true or false",
        "a sequence" => "a list",
        other if other.starts_with("struct ") || other == "a map" => "a mapping",
        other => other,
    };
    let got = got
        .strip_prefix("string ")
        .or_else(|| got.strip_prefix("integer "))
        .unwrap_or(got);
    format!("expected {expected}, got {got}")
}

/// Paths (`spec.clusterIp`, `spec.ports[0].portz`) present in `original`
/// but gone from `roundtrip`, the same object after a pass through its
/// Kubernetes type: the fields that type does not know. Nulls do not count.
fn dropped_fields(original: &Value, roundtrip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, roundtrip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => dropped_fields(v, w, &at, out),
                    None if !v.is_null() => out.push(at),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A document of a kind or API version Switchyard does not read, that is
/// probably meant as one it does: said per document.
fn near_miss(api_version: &str, kind: &str) -> Option<String> {
    match (api_version, kind) {
        (_, "Service") => Some(format!(
            "{api_version} Service is not read: Services are apiVersion v1; ignored"
        )),
        (_, "EndpointSlice") => Some(format!(
            "{api_version} EndpointSlice is not read: use apiVersion discovery.k8s.io/v1 \
             (v1beta1 was removed in Kubernetes 1.25); ignored"
        )),
        (_, "ServiceExport") => Some(format!(
            "{api_version} ServiceExport is not read: use apiVersion multicluster.x-k8s.io/v1beta1 (or v1alpha1); ignored"
        )),
        (_, "Endpoints") => Some(
            "v1 Endpoints are not read: endpoints come from discovery.k8s.io/v1 EndpointSlices \
             (the API server mirrors Endpoints into them); ignored"
                .to_owned(),
        ),
        _ => ["Service", "EndpointSlice", "ServiceExport", "List"]
            .into_iter()
            .find(|known| {
                kind.eq_ignore_ascii_case(known)
                    || edit_distance(&kind.to_ascii_lowercase(), &known.to_ascii_lowercase()) <= 2
            })
            .map(|known| format!("unknown kind {kind:?} (did you mean {known}?); ignored")),
    }
}

/// Levenshtein distance, for typo hints on short kind names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// One manifest file's objects as the `file:` source reads them, or why
/// it is not read at all (the fuzz target `manifest_loader` and tests).
pub fn parse_file(cluster: &str, path: &Path, bytes: &[u8]) -> Result<SourceState, String> {
    let objects = Parser {
        source: "file",
        cluster,
        cluster_annotation: false,
    }
    .file(path, bytes)?;
    Ok(SourceState {
        synced: true,
        services: objects.services.into_iter().map(|l| l.value).collect(),
        slices: objects.slices.into_iter().map(|l| l.value).collect(),
        errors: objects.errors,
        ..SourceState::default()
    })
}

/// Turns one file's bytes into objects.
struct Parser<'a> {
    source: &'a str,
    cluster: &'a str,
    /// Whether `switchyard.io/cluster` may move an object to another cluster.
    cluster_annotation: bool,
}

/// Where an object sits: its document, and its item when in a List.
struct Place<'a> {
    at: &'a str,
    item: Option<usize>,
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(i) => write!(f, "{} items[{i}]", self.at),
            None => f.write_str(self.at),
        }
    }
}

impl Parser<'_> {
    /// The objects of a file, or why it is not YAML at all.
    fn file(&self, path: &Path, bytes: &[u8]) -> Result<FileObjects, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let docs = parse_documents(text, budget())?;
        let mut out = FileObjects::default();
        let mut other_kinds: BTreeMap<String, usize> = BTreeMap::new();
        for (n, doc) in docs.into_iter().enumerate() {
            let at = format!("{}#{}", path.display(), n + 1);
            self.document(&at, doc, &mut out, &mut other_kinds);
        }
        if !other_kinds.is_empty() {
            // Kinds Kubernetes has but Switchyard does not read (an export
            // holds Deployments, ConfigMaps...): one line per file, not one
            // per object.
            let kinds: Vec<String> = other_kinds
                .iter()
                .map(|(k, n)| {
                    if *n == 1 {
                        k.clone()
                    } else {
                        format!("{k} x{n}")
                    }
                })
                .collect();
            out.warnings.push(self.error(
                &path.display().to_string(),
                String::new(),
                format!(
                    "ignored (only v1 Service and discovery.k8s.io/v1 EndpointSlice are read): {}",
                    kinds.join(", ")
                ),
            ));
        }
        Ok(out)
    }

    fn document(
        &self,
        at: &str,
        doc: Value,
        out: &mut FileObjects,
        other_kinds: &mut BTreeMap<String, usize>,
    ) {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let Some(items) = doc.get("items").and_then(Value::as_array) else {
            self.object(&Place { at, item: None }, &doc, None, out, other_kinds);
            return;
        };
        if kind != "List" && !kind.ends_with("List") {
            self.object(&Place { at, item: None }, &doc, None, out, other_kinds);
            return;
        }
        // Items of a typed list (`ServiceList`) from the API carry no apiVersion or kind.
        let defaults = kind
            .strip_suffix("List")
            .filter(|k| !k.is_empty())
            .map(|k| {
                let api_version = doc
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                (api_version, k)
            });
        for (i, item) in items.iter().enumerate() {
            self.object(
                &Place { at, item: Some(i) },
                item,
                defaults,
                out,
                other_kinds,
            );
        }
    }

    fn object(
        &self,
        place: &Place<'_>,
        obj: &Value,
        defaults: Option<(&str, &str)>,
        out: &mut FileObjects,
        other_kinds: &mut BTreeMap<String, usize>,
    ) {
        let located = |field: &str| match place.item {
            Some(i) if field.is_empty() => format!("items[{i}]"),
            Some(i) => format!("items[{i}].{field}"),
            None => field.to_owned(),
        };
        if !obj.is_object() {
            out.errors.push(self.error(
                place.at,
                located(""),
                "not a Kubernetes object (a mapping)",
            ));
            return;
        }
        let field = |name: &str| obj.get(name).and_then(Value::as_str);
        let api_version = field("apiVersion").or(defaults.map(|d| d.0));
        let kind = field("kind").or(defaults.map(|d| d.1));
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            out.errors.push(self.error(
                place.at,
                located("kind"),
                "apiVersion and kind are required",
            ));
            return;
        };
        let annotated = obj
            .pointer("/metadata/annotations/switchyard.io~1cluster")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty());
        let cluster = match annotated {
            Some(c) if self.cluster_annotation => c,
            Some(c) if c != self.cluster => {
                tracing::warn!(source = %self.source, at = %place.at, annotation = %c, cluster = %self.cluster,
                    "ignoring the {CLUSTER_ANNOTATION} annotation (enable it with --file-cluster-annotation)");
                self.cluster
            }
            _ => self.cluster,
        };
        let meta = |name: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let namespace = meta("namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let name = meta("name").filter(|n| !n.is_empty());
        match (api_version, kind) {
            ("v1", "Service") => {
                let object = name
                    .map(|n| Service::new(ServiceKey::new(cluster, &namespace, n)).object_name());
                let svc = match serde_path_to_error::deserialize::<_, core::Service>(obj.clone()) {
                    Ok(svc) => svc,
                    Err(e) => {
                        return out.errors.push(self.unparsable(place, object, &located, e));
                    }
                };
                self.unknown_fields(place, object.as_deref(), obj, &svc, &located, out);
                let converted = k8s::service(cluster, &svc)
                    .and_then(|s| k8s::validate_unallocated(&s).map(|()| s));
                match converted {
                    Ok(s) => out.services.push(Located {
                        at: place.to_string(),
                        value: Arc::new(s),
                    }),
                    Err(e) => out.errors.extend(self.invalid(place, e)),
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let object = name.map(|n| {
                    let slice = EndpointSlice {
                        name: n,
                        ..EndpointSlice::default()
                    };
                    slice.object_name(&ServiceKey::new(cluster, &namespace, ""))
                });
                let slice = match serde_path_to_error::deserialize::<_, discovery::EndpointSlice>(
                    obj.clone(),
                ) {
                    Ok(slice) => slice,
                    Err(e) => {
                        return out.errors.push(self.unparsable(place, object, &located, e));
                    }
                };
                self.unknown_fields(place, object.as_deref(), obj, &slice, &located, out);
                match k8s::endpoint_slice(cluster, &slice) {
                    Ok(Some(s)) => out.slices.push(Located {
                        at: place.to_string(),
                        value: Arc::new(s),
                    }),
                    Ok(None) => tracing::debug!(at = %place, "FQDN EndpointSlice ignored"),
                    Err(e) => out.errors.extend(self.invalid(place, e)),
                }
            }
            (
                "multicluster.x-k8s.io/v1alpha1" | "multicluster.x-k8s.io/v1beta1",
                "ServiceExport",
            ) => match name {
                Some(n) if switchyard_model::is_dns_label(&n) => out.exports.push(Located {
                    at: place.to_string(),
                    value: Export {
                        key: ServiceKey::new(cluster, &namespace, n),
                        created_unix: obj
                            .pointer("/metadata/creationTimestamp")
                            .and_then(Value::as_str)
                            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                            .map(|t| t.as_second()),
                        exported: super::ExportedMeta::of(obj),
                    },
                }),
                _ => out.errors.push(self.error(
                    place.at,
                    located("metadata.name"),
                    "a ServiceExport names the Service it exports (a DNS label)",
                )),
            },
            _ => match near_miss(api_version, kind) {
                Some(message) => out.warnings.push(self.error(
                    &place.to_string(),
                    located(
                        if kind == "Service" || kind == "EndpointSlice" || kind == "ServiceExport" {
                            "apiVersion"
                        } else {
                            "kind"
                        },
                    ),
                    message,
                )),
                None => {
                    *other_kinds
                        .entry(format!("{api_version} {kind}"))
                        .or_default() += 1;
                }
            },
        }
    }

    /// Warns about every field of `obj` that `parsed` (its Kubernetes type)
    /// does not have: Kubernetes would refuse or warn about them (kubectl's
    /// strict decoding), and here they are silently without effect.
    fn unknown_fields<T: serde::Serialize>(
        &self,
        place: &Place<'_>,
        object: Option<&str>,
        obj: &Value,
        parsed: &T,
        located: &dyn Fn(&str) -> String,
        out: &mut FileObjects,
    ) {
        let Ok(back) = serde_json::to_value(parsed) else {
            return;
        };
        let mut unknown = Vec::new();
        dropped_fields(obj, &back, "", &mut unknown);
        for field in unknown {
            let w = match object {
                Some(object) => self.error(
                    object,
                    field,
                    format!("unknown field, ignored (in {place})"),
                ),
                None => self.error(place.at, located(&field), "unknown field, ignored"),
            };
            out.warnings.push(w);
        }
    }

    fn error(&self, object: &str, field: String, message: impl Into<String>) -> ObjectError {
        ObjectError {
            source: self.source.to_owned(),
            object: object.to_owned(),
            field,
            message: message.into(),
        }
    }

    /// An object whose fields have the wrong shape for its kind, named by
    /// the field at fault (`spec.ports[0].port`).
    fn unparsable(
        &self,
        place: &Place<'_>,
        object: Option<String>,
        located: &dyn Fn(&str) -> String,
        e: serde_path_to_error::Error<serde_json::Error>,
    ) -> ObjectError {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = type_error_message(e.inner());
        match object {
            Some(object) => self.error(&object, field, format!("{message} (in {place})")),
            None => self.error(place.at, located(&field), message),
        }
    }

    /// Conversion or validation errors, one per field.
    fn invalid(&self, place: &Place<'_>, e: ValidationErrors) -> Vec<ObjectError> {
        e.0.into_iter()
            .map(|e| self.error(&e.object, e.field, format!("{} (in {place})", e.message)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_reported_as_a_limit() {
        let mut small = budget();
        small.max_documents = 3;
        let e = parse_documents(&"---\na: 1\n".repeat(4), small).expect_err("over the limit");
        assert!(
            e.starts_with("the file has more than 4 documents; the limit is 3 per file; split it"),
            "{e}"
        );
        let mut small = budget();
        small.max_nodes = 10;
        let e = parse_documents("items: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n", small)
            .expect_err("over the limit");
        assert!(e.contains("YAML nodes; the limit is 10 per file"), "{e}");
        assert!(
            parse_documents("a: [1\n", budget())
                .expect_err("bad")
                .starts_with("not valid YAML")
        );
    }

    #[test]
    fn ip_families_and_policy_reach_the_model_and_bad_ones_name_their_field() {
        let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: shop}
spec:
  ipFamilies: [IPv7]
  ports: [{port: 80}]
";
        let state =
            parse_file("default", Path::new("/etc/sy/a.yaml"), yaml.as_bytes()).expect("a file");
        let dual = state
            .services
            .get(&ServiceKey::new("default", "shop", "dual"))
            .expect("read");
        assert_eq!(
            dual.requested_ip_families,
            [
                switchyard_model::IpFamily::V6,
                switchyard_model::IpFamily::V4
            ]
        );
        assert_eq!(
            dual.ip_family_policy,
            Some(switchyard_model::IpFamilyPolicy::RequireDualStack)
        );
        assert!(dual.cluster_ips.is_empty(), "the index allocates");
        let fields: Vec<(&str, &str)> = state
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(fields, [("Service shop/odd", "spec.ipFamilies[0]")]);
    }

    #[test]
    fn type_errors_read_as_expected_and_got() {
        let e = serde_json::from_value::<i32>(serde_json::json!("80")).expect_err("string");
        assert_eq!(type_error_message(&e), "expected an integer, got \"80\"");
    }

    #[test]
    fn near_misses_are_named() {
        assert!(near_miss("v1", "Servce").is_some_and(|m| m.contains("did you mean Service")));
        assert!(near_miss("v1", "endpointslice").is_some_and(|m| m.contains("EndpointSlice")));
        assert!(near_miss("apps/v1", "Deployment").is_none());
        assert_eq!(edit_distance("servce", "service"), 1);
    }
}
