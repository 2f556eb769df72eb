//! The `file:PATH` source: Services and EndpointSlices from YAML and JSON
//! manifests.
//!
//! Each PATH is a manifest file or a directory searched recursively for
//! `*.yaml`, `*.yml` and `*.json` files (hidden entries skipped, so the
//! `..data` links of a mounted ConfigMap are read once). A file holds
//! Kubernetes-shaped documents separated by `---`, or a `List` (a
//! `*.json` file: one JSON value, or several one after another); only
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
//!                                                          │ list files; read those whose
//!                                                          │ metadata changed; cut each at
//!                                                          │ `---`, hash each document,
//!                                                          │ re-parse changed ones
//!                                                          ▼
//!                                 merge from the last state: only the objects
//!                                 whose definitions changed are weighed again
//!                                                          ▼
//!                                 watch<SourceState> ◀─ publish if different
//! ```
//!
//! An edit costs what it changed. A file is cut into its documents
//! textually (a `---` at the start of a line always starts one in YAML) and
//! each is parsed on its own (those of a large file on up to 4 cores,
//! ahead of their conversion in order), so an edit re-parses only the documents whose
//! text or number (`PATH#N`) changed; a file that does not cut cleanly (a
//! directive, a `...` marker, anchors and aliases, a document that is not
//! valid alone, totals near the limits) is parsed whole as one part, as
//! before, so its limits and error messages are the same. A `*.json` file
//! is read by `serde_json` (its parse alone is about ten times
//! faster than the YAML parser's on the same objects, `bench_file_limits
//! scale`), from 64 MiB on streamed from disk rather than held whole
//! (hashed as it is read), counted against the same
//! limits as it is read, and the items of a `List` are converted as they
//! are read rather than after the whole file is one value; one that is not JSON but is YAML (JSON documents
//! between `---` lines, a trailing comma, a comment) is read as YAML, as
//! before; one that is neither is reported with JSON's error (`not valid
//! JSON: expected value at line 4 column 1`). Every object's
//! definitions are indexed by file and document, so a change weighs again
//! only the objects it touched, and says duplicates again only for the
//! files that share one of them. A file whose size, timestamps and inode
//! are as when it was last read, and were already older than that read by
//! `RACY` (2 s), is not read again; a `*.json` file read before is hashed
//! first and parsed only when its bytes changed.
//!
//! Failures stay local. A document that does not convert is skipped and
//! reported (as `Service ns/name`, or `PATH#N` for the N-th non-empty
//! document when it has no usable name); a file that is not valid YAML (or JSON) keeps
//! serving what it held before and is reported as a whole; when two files
//! define the same object, the first one in path order wins.
//!
//! A PATH that does not exist is not synced until it appears (so the index
//! publishes nothing and `/readyz` stays 503); one that disappears after
//! the first read keeps the files it held; either way the source's
//! `last_error` names it. Documents are converted through `crate::k8s`
//! (shared with the kube source) into k8s-openapi types with
//! `serde_path_to_error`, so a type error names its field
//! (`spec.ports[0].port`); every field the type ignores as it is
//! deserialized (`serde_ignored`) is an unknown field.
//! Unknown fields, and kinds and API versions that are not read, are
//! `warnings` of the source (shown per source in `/status`), not errors:
//! the object is still used. The loader's limits ([`MAX_DOCUMENTS`],
//! [`MAX_NODES`], [`MAX_SCALAR_BYTES`]; the same for YAML and JSON, with
//! `serde_json`'s nesting limit of 128 on top) are sized for a
//! 50,000-Service export (`bench_file_limits`), and a breach is reported
//! as the limit it is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::SystemTime;

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
    let mut loader = Loader::new(
        name.clone(),
        paths,
        source.cluster,
        source.cluster_annotation,
        watcher,
        watcher_error,
    );

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
        Self(Loader::new(
            source.name(),
            source.paths,
            source.cluster,
            false,
            None,
            None,
        ))
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

/// From this size on, a `*.json` file is parsed as it is read from disk
/// rather than read whole first ([`Parser::json_file`]): parsing from
/// memory is faster (0.29 s against 0.34-0.37 s for 10,000 Services, 22
/// MB), but a 224 MB export held whole would cost more than the objects it
/// makes. Tests stream every file that is not empty.
const JSON_STREAM_BYTES: u64 = if cfg!(test) { 1 } else { 64 << 20 };

/// Whether `path` is read as JSON (`*.json`, any case).
fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Everything the source knows between reloads. Lives on the blocking pool
/// while a reload runs.
struct Loader {
    source: String,
    paths: Vec<PathBuf>,
    cluster: String,
    cluster_annotation: bool,
    files: HashMap<PathBuf, LoadedFile>,
    /// The path of each file by its id.
    ids: HashMap<u64, PathBuf>,
    next_id: u64,
    /// The files in path order at the last reload, by id.
    order: Vec<u64>,
    /// Every definition of each Service, across files.
    service_defs: HashMap<ServiceKey, Defs<SourceService>>,
    /// Every definition of each slice (cluster, namespace and name: two
    /// Services' slices of one name are one object to Kubernetes too).
    slice_defs: HashMap<(String, String, String), Defs<SourceSlice>>,
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
    /// Names the file in [`Def`]s.
    id: u64,
    /// SHA-256 of the content last read, parsable or not.
    digest: [u8; 32],
    /// The file's metadata when its content was last read, and when that
    /// was: while it stays the same, the content is not read again.
    seen: Option<(Stat, SystemTime)>,
    /// What the last parsable content held, a part per document (or one
    /// for the whole file, when it does not split).
    parts: Vec<Part>,
    /// The kinds the file holds that are not read, said once per file.
    kinds: Option<ObjectError>,
    /// Whether any part has errors, warnings or exports: a file with none
    /// is not walked part by part at every reload.
    noted: bool,
    /// Why the current content could not be used, if it could not.
    unreadable: Option<String>,
    /// The Services, then the slices, defined again after a first definition.
    duplicates: (Vec<ObjectError>, Vec<ObjectError>),
}

impl LoadedFile {
    fn new(id: u64) -> Self {
        Self {
            id,
            digest: [0; 32],
            seen: None,
            parts: Vec::new(),
            kinds: None,
            noted: false,
            unreadable: None,
            duplicates: (Vec::new(), Vec::new()),
        }
    }
}

/// The objects and per-object errors of one document (or file), in order.
#[derive(Debug, Default)]
struct FileObjects {
    services: Vec<Located<Arc<SourceService>>>,
    slices: Vec<Located<Arc<SourceSlice>>>,
    exports: Vec<Located<Export>>,
    errors: Vec<ObjectError>,
    warnings: Vec<ObjectError>,
    /// Kinds Switchyard does not read, counted (said once per file).
    other_kinds: BTreeMap<String, usize>,
}

impl FileObjects {
    /// `other`'s objects after these.
    fn append(&mut self, mut other: FileObjects) {
        self.services.append(&mut other.services);
        self.slices.append(&mut other.slices);
        self.exports.append(&mut other.exports);
        self.errors.append(&mut other.errors);
        self.warnings.append(&mut other.warnings);
        for (kind, n) in other.other_kinds {
            *self.other_kinds.entry(kind).or_default() += n;
        }
    }
}

/// What one JSON document's items made as they were read.
#[derive(Debug, Default)]
struct Streamed {
    objects: FileObjects,
    /// Items converted.
    taken: usize,
    /// The first item kept for the end of the document, if any was.
    first_kept: Option<usize>,
}

/// An object with the document it came from (`PATH#N`).
#[derive(Debug)]
struct Located<T> {
    at: String,
    value: T,
}

/// What `stat` says of a file's content: the same after a write only if
/// the write came within the file system's timestamp granularity, which
/// [`Loader::read_file`] allows for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    inode: (u64, u64),
}

impl Stat {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
            inode: (m.dev(), m.ino()),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &Path) -> Option<Self> {
        None
    }

    /// Whether both timestamps are older than `read` by more than any
    /// granularity: a later write then shows in them.
    fn settled(&self, read: SystemTime) -> bool {
        let Some(margin) = read.checked_sub(RACY) else {
            return false;
        };
        [self.modified, self.changed].iter().all(|&(s, ns)| {
            u64::try_from(s).is_ok_and(|s| {
                SystemTime::UNIX_EPOCH
                    + std::time::Duration::new(s, ns.clamp(0, 999_999_999) as u32)
                    < margin
            })
        })
    }
}

/// How much older than its last read a file's timestamps must be for its
/// metadata to stand for its content (as git's "racily clean" entries): a
/// write within the same timestamp tick as the read is not missed.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a definition sits: its file, document part and index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Def {
    file: u64,
    part: u32,
    item: u32,
}

impl Def {
    fn new(file: u64, part: usize, item: usize) -> Self {
        Self {
            file,
            part: u32::try_from(part).unwrap_or(u32::MAX),
            item: u32::try_from(item).unwrap_or(u32::MAX),
        }
    }
}

/// A kind of object the loader indexes by definition: where a part holds
/// the objects of the kind.
trait Defined: super::Keyed + PartialEq + Sized {
    fn in_part(objects: &FileObjects) -> &[Located<Arc<Self>>];
}

impl Defined for SourceService {
    fn in_part(objects: &FileObjects) -> &[Located<Arc<Self>>] {
        &objects.services
    }
}

impl Defined for SourceSlice {
    fn in_part(objects: &FileObjects) -> &[Located<Arc<Self>>] {
        &objects.slices
    }
}

/// Every definition of one object, and what the state holds for it.
#[derive(Debug)]
struct Defs<T> {
    defs: Vec<Def>,
    published: Option<Arc<T>>,
}

impl<T> Default for Defs<T> {
    fn default() -> Self {
        Self {
            defs: Vec::new(),
            published: None,
        }
    }
}

/// How one file's parts changed at a reload.
struct Change {
    file: u64,
    /// The parts it had, with those it still has taken out.
    old: Vec<Part>,
    /// For each part it has now (none when it is gone), where it was.
    reused: Vec<Option<usize>>,
}

/// The keys whose definitions changed at a reload, and whether one of
/// them is or was defined more than once.
struct Affected {
    /// None: every key (a first load, or files that changed places).
    services: Option<HashSet<ServiceKey>>,
    slices: Option<HashSet<(String, String, String)>>,
    /// Files whose duplicate errors must be made again.
    recheck: HashSet<u64>,
}

fn slice_def_key(s: &SourceSlice) -> (String, String, String) {
    (
        s.service.cluster.clone(),
        s.service.namespace.clone(),
        s.slice.name.clone(),
    )
}

impl Loader {
    fn new(
        source: String,
        paths: Vec<PathBuf>,
        cluster: String,
        cluster_annotation: bool,
        watcher: Option<RecommendedWatcher>,
        watcher_error: Option<String>,
    ) -> Self {
        Self {
            source,
            paths,
            cluster,
            cluster_annotation,
            files: HashMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            order: Vec::new(),
            service_defs: HashMap::new(),
            slice_defs: HashMap::new(),
            watcher,
            watched: BTreeMap::new(),
            watcher_error,
            complete_once: false,
            last: SourceState::default(),
        }
    }

    /// Brings the watches up to date, reads the files that changed and
    /// returns the whole new state, made from the last one where only
    /// what changed is done again.
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
        let mut changes = Vec::new();
        for path in &files {
            changes.extend(self.read_file(path));
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
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(file) = self.files.remove(&path) {
                self.ids.remove(&file.id);
                changes.push(Change {
                    file: file.id,
                    old: file.parts,
                    reused: Vec::new(),
                });
            }
        }
        self.complete_once |= missing.is_empty();
        let mut state = self.assemble(&files, changes, errors);
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

    /// Reads one file unless its metadata says it is as last read, and
    /// re-parses what changed in it (the documents whose text or number
    /// changed). Says which parts were replaced, when some were.
    fn read_file(&mut self, path: &Path) -> Option<Change> {
        let read_at = SystemTime::now();
        let stat = Stat::of(path);
        if let (Some(file), Some(stat)) = (self.files.get(path), &stat)
            && file
                .seen
                .as_ref()
                .is_some_and(|(seen, at)| seen == stat && seen.settled(*at))
        {
            return None;
        }
        let known = self.files.get(path).map_or([0; 32], |f| f.digest);
        let large = stat.as_ref().is_none_or(|s| s.len >= JSON_STREAM_BYTES);
        let read = if is_json(path) && large {
            // A large JSON file is parsed as it is read: one read before is
            // hashed alone first, so that the same bytes again (a file
            // touched, or read again too soon after it was written) cost a
            // hash, not a parse.
            if known != [0; 32] && hash_file(path).is_ok_and(|d| d == known) {
                self.note_digest(path, stat, read_at, known);
                return None;
            }
            self.parser().json_file(path)
        } else {
            std::fs::read(path).map(Fetched::Bytes)
        };
        let read = match read {
            Ok(read) => read,
            // Removed since it was listed: the next event will tell.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                let entry = self.entry(path);
                // Forget the digest so that the content is parsed once readable again.
                entry.digest = [0; 32];
                entry.seen = None;
                entry.unreadable = Some(format!("cannot read: {e}"));
                return None;
            }
        };
        let parsed = match read {
            Fetched::Bytes(bytes) => {
                let content = Content::of(path, &bytes);
                if !self.note_digest(path, stat, read_at, content.digest) {
                    return None;
                }
                // Not `self.parser()`: the parts are borrowed from `self.files`.
                let parser = Parser {
                    source: &self.source,
                    cluster: &self.cluster,
                    cluster_annotation: self.cluster_annotation,
                };
                let entry = self.files.get_mut(path)?;
                parser.parts(path, content, &mut entry.parts)
            }
            Fetched::Json(digest, part) => {
                if !self.note_digest(path, stat, read_at, digest) {
                    return None;
                }
                part.map(|part| (vec![*part], vec![None]))
            }
        };
        let kinds = parsed
            .as_ref()
            .ok()
            .and_then(|(parts, _)| self.parser().kinds(path, parts));
        let entry = self.files.get_mut(path)?;
        match parsed {
            Ok((parts, reused)) => {
                entry.kinds = kinds;
                entry.noted = parts.iter().any(|p| {
                    let o = &p.objects;
                    !(o.errors.is_empty() && o.warnings.is_empty() && o.exports.is_empty())
                });
                entry.unreadable = None;
                let old = std::mem::replace(&mut entry.parts, parts);
                Some(Change {
                    file: entry.id,
                    old,
                    reused,
                })
            }
            Err(message) => {
                tracing::warn!(path = %path.display(), %message, "keeping the previous content of a broken file");
                entry.unreadable = Some(message);
                None
            }
        }
    }

    /// What turns this source's files into objects.
    fn parser(&self) -> Parser<'_> {
        Parser {
            source: &self.source,
            cluster: &self.cluster,
            cluster_annotation: self.cluster_annotation,
        }
    }

    /// Notes that the file at `path` was read with `stat` at `read_at` and
    /// holds `digest`; whether that is new (its content is to be used).
    fn note_digest(
        &mut self,
        path: &Path,
        stat: Option<Stat>,
        read_at: SystemTime,
        digest: [u8; 32],
    ) -> bool {
        let entry = self.entry(path);
        entry.seen = stat.map(|s| (s, read_at));
        if entry.digest == digest {
            return false;
        }
        entry.digest = digest;
        true
    }

    /// The file at `path`, known from now on.
    fn entry(&mut self, path: &Path) -> &mut LoadedFile {
        if !self.files.contains_key(path) {
            let id = self.next_id;
            self.next_id += 1;
            self.ids.insert(id, path.to_path_buf());
            self.files.insert(path.to_path_buf(), LoadedFile::new(id));
        }
        self.files.get_mut(path).expect("just inserted")
    }

    /// Records where the objects of a changed file went: definitions of
    /// parts no longer there (or moved) out, of new (or moved) parts in.
    fn apply(&mut self, change: Change, affected: &mut Affected) {
        let f = change.file;
        let now: &[Part] = match self.ids.get(&f).and_then(|p| self.files.get(p)) {
            Some(file) => &file.parts,
            None => &[],
        };
        let place = |part: usize, item: usize| Def::new(f, part, item);
        // What left its place: parts dropped, and parts reused elsewhere.
        let mut taken = vec![false; change.old.len()];
        for q in change.reused.iter().flatten() {
            taken[*q] = true;
        }
        let mut gone: Vec<(usize, &Part)> = change
            .old
            .iter()
            .enumerate()
            .filter(|(q, _)| !taken[*q])
            .collect();
        gone.extend(
            change
                .reused
                .iter()
                .zip(now)
                .enumerate()
                .filter_map(|(p, (r, part))| r.filter(|q| *q != p).map(|q| (q, part))),
        );
        for (q, part) in gone {
            for (i, s) in part.objects.services.iter().enumerate() {
                unset(
                    &mut self.service_defs,
                    &s.value.key,
                    place(q, i),
                    &mut affected.services,
                    &mut affected.recheck,
                );
            }
            for (i, s) in part.objects.slices.iter().enumerate() {
                unset(
                    &mut self.slice_defs,
                    &slice_def_key(&s.value),
                    place(q, i),
                    &mut affected.slices,
                    &mut affected.recheck,
                );
            }
        }
        for (p, part) in now.iter().enumerate() {
            if change.reused.get(p) == Some(&Some(p)) {
                continue;
            }
            for (i, s) in part.objects.services.iter().enumerate() {
                set(
                    &mut self.service_defs,
                    &s.value.key,
                    place(p, i),
                    &mut affected.services,
                    &mut affected.recheck,
                );
            }
            for (i, s) in part.objects.slices.iter().enumerate() {
                set(
                    &mut self.slice_defs,
                    &slice_def_key(&s.value),
                    place(p, i),
                    &mut affected.slices,
                    &mut affected.recheck,
                );
            }
        }
    }

    /// Merges the files in path order: the first definition of an object
    /// wins. Made from the last state: only the objects whose definitions
    /// changed are weighed again, and only the files holding one of them
    /// have their duplicates said again.
    fn assemble(
        &mut self,
        files: &[PathBuf],
        changes: Vec<Change>,
        mut errors: Vec<ObjectError>,
    ) -> SourceState {
        let order: Vec<u64> = files
            .iter()
            .filter_map(|p| self.files.get(p))
            .map(|f| f.id)
            .collect();
        let rank: HashMap<u64, usize> = order.iter().enumerate().map(|(r, id)| (*id, r)).collect();
        // Before any file, every key is new: none is recorded one by one.
        let every = self.order.is_empty();
        let mut affected = Affected {
            services: (!every).then(HashSet::new),
            slices: (!every).then(HashSet::new),
            recheck: HashSet::new(),
        };
        // A file's duplicates change only with a key defined more than once
        // (before or after), which `set` and `unset` record.
        for change in changes {
            self.apply(change, &mut affected);
        }
        // Files that changed places among themselves (those of a PATH gone
        // missing move to the end) may change every winner.
        let before: HashSet<u64> = self.order.iter().copied().collect();
        let kept_then = self.order.iter().filter(|id| rank.contains_key(id));
        let kept_now = order.iter().filter(|id| before.contains(id));
        if !kept_then.eq(kept_now) {
            affected.services = None;
            affected.slices = None;
            affected.recheck.extend(order.iter().copied());
        }
        self.order = order;
        let mut services = self.last.services.clone();
        let mut slices = self.last.slices.clone();
        let at = (&self.files, &self.ids);
        settle_keys(
            &mut self.service_defs,
            affected.services.as_ref(),
            at,
            &rank,
            &mut services,
        );
        settle_keys(
            &mut self.slice_defs,
            affected.slices.as_ref(),
            at,
            &rank,
            &mut slices,
        );
        for id in &affected.recheck {
            let Some(path) = self.ids.get(id) else {
                continue;
            };
            let duplicates = self.duplicates(&self.files[path], &rank);
            if let Some(file) = self.files.get_mut(&self.ids[id].clone()) {
                file.duplicates = duplicates;
            }
        }
        let mut warnings = Vec::new();
        let mut exports = Vec::new();
        let mut exported = HashSet::new();
        for path in files {
            let Some(file) = self.files.get(path) else {
                continue;
            };
            if let Some(message) = &file.unreadable {
                errors.push(self.error(path.display().to_string(), "", message.clone()));
            }
            let noted: &[Part] = if file.noted { &file.parts } else { &[] };
            for part in noted {
                errors.extend(part.objects.errors.iter().cloned());
                warnings.extend(part.objects.warnings.iter().cloned());
                for e in &part.objects.exports {
                    if exported.insert(&e.value.key) {
                        exports.push(e.value.clone());
                    }
                }
            }
            errors.extend(file.duplicates.0.iter().cloned());
            errors.extend(file.duplicates.1.iter().cloned());
            warnings.extend(file.kinds.iter().cloned());
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

    /// The errors for the objects of `file` that another definition won
    /// over (a file before it, or a document before them): its Services',
    /// then its slices'.
    fn duplicates(
        &self,
        file: &LoadedFile,
        rank: &HashMap<u64, usize>,
    ) -> (Vec<ObjectError>, Vec<ObjectError>) {
        let here = |part: usize, item: usize| Def::new(file.id, part, item);
        let again = |at: &str, first: Option<&str>| {
            format!(
                "defined again in {at}; the one in {} is used",
                first.unwrap_or_default()
            )
        };
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for (p, part) in file.parts.iter().enumerate() {
            for (i, s) in part.objects.services.iter().enumerate() {
                let won = self
                    .service_defs
                    .get(&s.value.key)
                    .and_then(|d| winner(&d.defs, rank));
                if let Some(w) = won.filter(|w| *w != here(p, i)) {
                    let first =
                        defined::<SourceService>(&self.files, &self.ids, w).map(|s| s.at.as_str());
                    services.push(self.error(s.value.object_name(), "", again(&s.at, first)));
                }
            }
        }
        for (p, part) in file.parts.iter().enumerate() {
            for (i, s) in part.objects.slices.iter().enumerate() {
                let won = self
                    .slice_defs
                    .get(&slice_def_key(&s.value))
                    .and_then(|d| winner(&d.defs, rank));
                if let Some(w) = won.filter(|w| *w != here(p, i)) {
                    let first =
                        defined::<SourceSlice>(&self.files, &self.ids, w).map(|s| s.at.as_str());
                    slices.push(self.error(
                        s.value.slice.object_name(&s.value.service),
                        "",
                        again(&s.at, first),
                    ));
                }
            }
        }
        (services, slices)
    }
}

/// The object a definition points at.
fn defined<'a, T: Defined>(
    files: &'a HashMap<PathBuf, LoadedFile>,
    ids: &HashMap<u64, PathBuf>,
    d: Def,
) -> Option<&'a Located<Arc<T>>> {
    let part = files.get(ids.get(&d.file)?)?.parts.get(d.part as usize)?;
    T::in_part(&part.objects).get(d.item as usize)
}

/// Settles the objects of `keys` (every one when None): see [`settle`].
/// `at` is where the definitions are (the files, by id).
fn settle_keys<K: Eq + std::hash::Hash, T: Defined>(
    defs: &mut HashMap<K, Defs<T>>,
    keys: Option<&HashSet<K>>,
    (files, ids): (&HashMap<PathBuf, LoadedFile>, &HashMap<u64, PathBuf>),
    rank: &HashMap<u64, usize>,
    map: &mut super::Objects<T>,
) {
    let value = |d| defined::<T>(files, ids, d).map(|l| Arc::clone(&l.value));
    let Some(keys) = keys else {
        defs.retain(|_, d| {
            let won = winner(&d.defs, rank).and_then(&value);
            !settle(d, won, map)
        });
        return;
    };
    for key in keys {
        let Some(d) = defs.get_mut(key) else {
            continue;
        };
        let won = winner(&d.defs, rank).and_then(&value);
        if settle(d, won, map) {
            defs.remove(key);
        }
    }
}

/// The first of `defs` in path order, then document order.
fn winner(defs: &[Def], rank: &HashMap<u64, usize>) -> Option<Def> {
    defs.iter()
        .min_by_key(|d| {
            (
                rank.get(&d.file).copied().unwrap_or(usize::MAX),
                d.part,
                d.item,
            )
        })
        .copied()
}

/// Takes `def` out of the definitions of `key`.
fn unset<K: Clone + Eq + std::hash::Hash, T>(
    defs: &mut HashMap<K, Defs<T>>,
    key: &K,
    def: Def,
    affected: &mut Option<HashSet<K>>,
    recheck: &mut HashSet<u64>,
) {
    if let Some(d) = defs.get_mut(key) {
        if d.defs.len() > 1 {
            recheck.extend(d.defs.iter().map(|d| d.file));
        }
        d.defs.retain(|x| *x != def);
    }
    if let Some(affected) = affected {
        affected.insert(key.clone());
    }
}

/// Adds `def` to the definitions of `key`.
fn set<K: Clone + Eq + std::hash::Hash, T>(
    defs: &mut HashMap<K, Defs<T>>,
    key: &K,
    def: Def,
    affected: &mut Option<HashSet<K>>,
    recheck: &mut HashSet<u64>,
) {
    let d = match defs.get_mut(key) {
        Some(d) => d,
        None => defs.entry(key.clone()).or_default(),
    };
    d.defs.push(def);
    if d.defs.len() > 1 {
        recheck.extend(d.defs.iter().map(|d| d.file));
    }
    if let Some(affected) = affected {
        affected.insert(key.clone());
    }
}

/// Puts the winning definition `won` of one object into `map` in place of
/// what was published for it; an equal object keeps the published `Arc`
/// (the index tells changes by pointer). Whether no definition is left.
fn settle<T: super::Keyed + PartialEq>(
    defs: &mut Defs<T>,
    won: Option<Arc<T>>,
    map: &mut super::Objects<T>,
) -> bool {
    if let Some(old) = &defs.published
        && won.as_ref().is_none_or(|w| w.key() != old.key())
    {
        map.remove(&old.key());
    }
    let Some(won) = won else {
        return true;
    };
    let kept = match map.get(&won.key()) {
        Some(current) if Arc::ptr_eq(current, &won) || **current == *won => Arc::clone(current),
        _ => {
            map.push(Arc::clone(&won));
            won
        }
    };
    defs.published = Some(kept);
    false
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
    over_limit(&what, &limit)
}

/// What a `*.json` file may hold: the YAML loader's limits, counted the
/// same way (every value and every key is a node, the text of keys and
/// strings counts as scalar bytes, each top-level value is a document).
/// `serde_json`'s nesting limit (128) stays on.
#[derive(Debug, Clone, Copy)]
struct JsonLimits {
    documents: usize,
    nodes: usize,
    scalar_bytes: usize,
}

const JSON_LIMITS: JsonLimits = JsonLimits {
    documents: MAX_DOCUMENTS,
    nodes: MAX_NODES,
    scalar_bytes: MAX_SCALAR_BYTES,
};

/// Why a `*.json` file was not read.
#[derive(Debug, PartialEq)]
enum JsonError {
    /// Not JSON: `serde_json`'s message, with line and column.
    Syntax(String),
    /// A limit the file broke, said as YAML's are.
    Limit(String),
}

/// The values of a JSON file (one, or several separated by whitespace),
/// built as [`Value`]s while counted against `limits`.
#[cfg(test)]
fn parse_json(text: &str, limits: JsonLimits) -> Result<Vec<Value>, JsonError> {
    if json_is_blank(text) {
        return Ok(Vec::new());
    }
    parse_json_items(
        serde_json::Deserializer::from_str(text.trim_start_matches('\u{feff}')),
        limits,
        &mut |_, _, _, item| Some(item),
    )
}

/// Whether a JSON text holds nothing but byte-order marks and blanks.
fn json_is_blank(text: &str) -> bool {
    text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n'])
        .is_empty()
}

/// What takes the items of a top-level JSON object as they are read:
/// `(document, the object's keys read so far, item index, item)`; it
/// returns the item to keep it in the document, or `None` when it has
/// taken it.
type ItemSink<'a> =
    dyn FnMut(usize, &serde_json::Map<String, Value>, usize, Value) -> Option<Value> + 'a;

/// [`parse_json`], with each item of a top-level object's `items` array
/// handed to `sink` as soon as it is read: a `List` of 100,000 Services
/// need not exist whole as one [`Value`] (2.4 GiB) before its first item
/// is converted.
/// The input is a text or a reader (`de`), at least one value, past any
/// byte-order mark.
fn parse_json_items<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    limits: JsonLimits,
    sink: &mut ItemSink<'_>,
) -> Result<Vec<Value>, JsonError> {
    use serde::de::DeserializeSeed;
    let counter = JsonCounter {
        limits,
        nodes: std::cell::Cell::new(0),
        scalar_bytes: std::cell::Cell::new(0),
        breach: std::cell::Cell::new(None),
    };
    let mut docs = Vec::new();
    loop {
        if docs.len() == limits.documents {
            return Err(JsonError::Limit(over_limit(
                &format!("{} documents", limits.documents),
                &limits.documents.to_string(),
            )));
        }
        let top = JsonTop {
            counter: &counter,
            document: docs.len(),
            sink: &mut *sink,
        };
        match top.deserialize(&mut de) {
            Ok(v) => docs.push(v),
            Err(e) => {
                return Err(match counter.breach.take() {
                    Some(message) => JsonError::Limit(message),
                    None => JsonError::Syntax(format!("not valid JSON: {e}")),
                });
            }
        }
        if de.end().is_ok() {
            return Ok(docs);
        }
    }
}

/// A limit the file broke, with what to do (the words of YAML's).
fn over_limit(what: &str, limit: &str) -> String {
    format!(
        "the file has more than {what}; the limit is {limit} per file; split it into several files"
    )
}

/// Counts a JSON file's nodes and text as it is read.
struct JsonCounter {
    limits: JsonLimits,
    nodes: std::cell::Cell<usize>,
    scalar_bytes: std::cell::Cell<usize>,
    /// The message of the limit broken, once one is.
    breach: std::cell::Cell<Option<String>>,
}

impl JsonCounter {
    /// One more node, with `bytes` of text; an error once over a limit.
    fn count<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let nodes = self.nodes.get() + 1;
        let scalar_bytes = self.scalar_bytes.get() + bytes;
        self.nodes.set(nodes);
        self.scalar_bytes.set(scalar_bytes);
        let l = self.limits;
        let message = if nodes > l.nodes {
            over_limit(&format!("{} JSON nodes", l.nodes), &l.nodes.to_string())
        } else if scalar_bytes > l.scalar_bytes {
            over_limit(
                &format!("{} bytes of text", l.scalar_bytes),
                &format!("{} bytes", l.scalar_bytes),
            )
        } else {
            return Ok(());
        };
        self.breach.set(Some(message.clone()));
        Err(E::custom(message))
    }
}

/// A seed that reads any JSON value with its own visitor (`self`).
macro_rules! seed_of_any {
    ($seed:ty) => {
        impl<'de> serde::de::DeserializeSeed<'de> for $seed {
            type Value = Value;

            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                d.deserialize_any(self)
            }
        }
    };
}

/// The visitor methods of a counted JSON value that are the same for
/// every seed here: a scalar is a [`Value`], counted as [`JsonNode`] counts it.
macro_rules! json_scalars_as_values {
    () => {
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
            JsonNode(self.counter).visit_bool(v)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
            JsonNode(self.counter).visit_i64(v)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
            JsonNode(self.counter).visit_u64(v)
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
            JsonNode(self.counter).visit_f64(v)
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
            JsonNode(self.counter).visit_str(v)
        }

        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
            JsonNode(self.counter).visit_string(v)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
            JsonNode(self.counter).visit_unit()
        }
    };
}

/// A top-level JSON value, counted, whose `items` (when it is an object
/// and they are an array) go to the sink one by one.
struct JsonTop<'c, 's, 'a> {
    counter: &'c JsonCounter,
    document: usize,
    sink: &'s mut ItemSink<'a>,
}

seed_of_any!(JsonTop<'_, '_, '_>);

impl<'de> serde::de::Visitor<'de> for JsonTop<'_, '_, '_> {
    type Value = Value;

    json_scalars_as_values!();

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        JsonNode(self.counter).visit_seq(seq)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let JsonTop {
            counter,
            document,
            sink,
        } = self;
        read_object(counter, map, |key, head, map| {
            if key == "items" {
                map.next_value_seed(JsonItems {
                    counter,
                    document,
                    head,
                    sink: &mut *sink,
                })
            } else {
                map.next_value_seed(JsonNode(counter))
            }
        })
    }
}

/// The `items` of a top-level object: an array's elements go to the sink
/// as they are read (those it gives back stay); anything else is a value.
struct JsonItems<'c, 'h, 's, 'a> {
    counter: &'c JsonCounter,
    document: usize,
    head: &'h serde_json::Map<String, Value>,
    sink: &'s mut ItemSink<'a>,
}

seed_of_any!(JsonItems<'_, '_, '_, '_>);

impl<'de> serde::de::Visitor<'de> for JsonItems<'_, '_, '_, '_> {
    type Value = Value;

    json_scalars_as_values!();

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        JsonNode(self.counter).visit_map(map)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.counter.count(0)?;
        let mut kept = Vec::new();
        let mut i = 0;
        while let Some(item) = seq.next_element_seed(JsonNode(self.counter))? {
            if let Some(item) = (self.sink)(self.document, self.head, i, item) {
                kept.push(item);
            }
            i += 1;
        }
        Ok(Value::Array(kept))
    }
}

/// One JSON value, counted: a [`Value`] as `serde_json` builds it.
struct JsonNode<'c>(&'c JsonCounter);

seed_of_any!(JsonNode<'_>);

/// One key of a JSON object, counted.
struct JsonKey<'c>(&'c JsonCounter);

impl<'de> serde::de::DeserializeSeed<'de> for JsonKey<'_> {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for JsonKey<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        self.0.count(v.len())?;
        Ok(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        self.0.count(v.len())?;
        Ok(v)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonNode<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.count(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.count(0)?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.count(0)?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.count(0)?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.count(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.0.count(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.count(0)?;
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.count(0)?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(JsonNode(self.0))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let counter = self.0;
        read_object(counter, map, |_, _, map| {
            map.next_value_seed(JsonNode(counter))
        })
    }
}

/// A JSON object, counted, each value read by `value` (given its key, the
/// keys and values read before it, and the map).
fn read_object<'de, A: serde::de::MapAccess<'de>>(
    counter: &JsonCounter,
    mut map: A,
    mut value: impl FnMut(&str, &serde_json::Map<String, Value>, &mut A) -> Result<Value, A::Error>,
) -> Result<Value, A::Error> {
    counter.count(0)?;
    let mut object = serde_json::Map::new();
    while let Some(k) = map.next_key_seed(JsonKey(counter))? {
        // Refused, as the YAML parser refuses them (serde_json's own
        // `Value` would keep the last).
        if object.contains_key(&k) {
            return Err(serde::de::Error::custom(format_args!(
                "duplicate key {k:?}"
            )));
        }
        let v = value(&k, &object, &mut map)?;
        object.insert(k, v);
    }
    Ok(Value::Object(object))
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

/// `obj` as a `T`, with the paths (`spec.clusterIp`, `spec.ports[0].portz`)
/// of the fields `T` does not know (Kubernetes' strict decoding would
/// refuse them; nulls do not count), or the field at fault. Deserialized
/// once, noting each field the type ignores as it goes; again through
/// `serde_path_to_error` only when that fails (tracking the path of every
/// field costs a string per key, the same error either way). Serializing
/// the typed object back to compare it with `obj`, before, was a quarter
/// of a 100,000-Service JSON load (perf, 7 Dec 2026).
fn typed<T: serde::de::DeserializeOwned>(
    obj: &Value,
) -> Result<(T, Vec<String>), serde_path_to_error::Error<serde_json::Error>> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(obj, |path| {
        if value_at(obj, &path).is_none_or(|v| !v.is_null()) {
            let mut field = String::new();
            write_path(&path, &mut field);
            unknown.push(field);
        }
    });
    match parsed {
        Ok(t) => Ok((t, unknown)),
        Err(_) => serde_path_to_error::deserialize(obj).map(|t| (t, Vec::new())),
    }
}

/// The value at `path` in `obj`.
fn value_at<'v>(obj: &'v Value, path: &serde_ignored::Path<'_>) -> Option<&'v Value> {
    use serde_ignored::Path;
    match path {
        Path::Root => Some(obj),
        Path::Seq { parent, index } => value_at(obj, parent)?.get(*index),
        Path::Map { parent, key } => value_at(obj, parent)?.get(key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => value_at(obj, parent),
    }
}

/// `path` as a field is named in messages: `spec.ports[0].portz`.
fn write_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            write_path(parent, out);
            let _ = write!(out, "[{index}]");
        }
        Path::Map { parent, key } => {
            write_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => {
            write_path(parent, out);
        }
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
    let (parts, _) = Parser {
        source: "file",
        cluster,
        cluster_annotation: false,
    }
    .parts(path, Content::of(path, bytes), &mut [])?;
    let objects = parts.into_iter().map(|p| p.objects);
    let mut state = SourceState {
        synced: true,
        ..SourceState::default()
    };
    for o in objects {
        state
            .services
            .extend(o.services.into_iter().map(|l| l.value));
        state.slices.extend(o.slices.into_iter().map(|l| l.value));
        state.errors.extend(o.errors);
    }
    Ok(state)
}

/// A file as [`Loader::read_file`] has it.
enum Fetched {
    /// Its bytes, to be parsed.
    Bytes(Vec<u8>),
    /// A `*.json` file parsed as it was read: its digest, and its one part
    /// or why it is not used.
    Json([u8; 32], Result<Box<Part>, String>),
}

/// The SHA-256 of a file's bytes, read a piece at a time.
fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut file = Hashing {
        inner: std::fs::File::open(path)?,
        hasher: &mut hasher,
    };
    io::copy(&mut file, &mut io::sink())?;
    Ok(hasher.finalize().into())
}

/// A reader that hashes what it reads.
struct Hashing<'h, R> {
    inner: R,
    hasher: &'h mut Sha256,
}

impl<R: io::Read> io::Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// One document of a file as parsed, or the whole file when it does not
/// split into documents.
#[derive(Debug, Default)]
struct Part {
    /// SHA-256 of the document's text; none for a whole file.
    digest: Option<[u8; 32]>,
    /// The documents before it in the file (its own is `PATH#before+1`).
    before: usize,
    /// The documents it holds (an empty one is not numbered).
    documents: usize,
    /// What it counted against the file's loader limits.
    cost: Cost,
    objects: FileObjects,
}

/// A document's count against the limits the YAML loader enforces per file.
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    documents: usize,
    nodes: usize,
    events: usize,
    scalar_bytes: usize,
}

impl Cost {
    fn add(&mut self, other: Self) {
        self.documents += other.documents;
        self.nodes += other.nodes;
        self.events += other.events;
        self.scalar_bytes += other.scalar_bytes;
    }

    /// Whether a whole file of this cost is surely within [`budget`] (the
    /// events of pieces parsed apart count one stream each, more than the
    /// file's one).
    fn within_limits(&self) -> bool {
        self.documents <= MAX_DOCUMENTS
            && self.nodes <= MAX_NODES
            && self.events <= 2 * MAX_NODES
            && self.scalar_bytes <= MAX_SCALAR_BYTES
    }
}

/// A file's bytes as the parser takes them: its text, the documents it
/// splits into with their digests, and the digest of the whole.
struct Content<'a> {
    text: Result<&'a str, String>,
    /// Whether the file is named `*.json`: read by `serde_json` (from this
    /// text when the loader did not stream it from disk, see
    /// [`Parser::json_file`]).
    json: bool,
    pieces: Option<Vec<(&'a str, [u8; 32])>>,
    digest: [u8; 32],
}

impl<'a> Content<'a> {
    fn of(path: &Path, bytes: &'a [u8]) -> Self {
        let json = is_json(path);
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"));
        let pieces: Option<Vec<(&str, [u8; 32])>> = text
            .as_ref()
            .ok()
            .filter(|_| !json)
            .and_then(|t| split_documents(t))
            .map(|pieces| {
                pieces
                    .into_iter()
                    .map(|p| (p, Sha256::digest(p.as_bytes()).into()))
                    .collect()
            });
        // The pieces make up the text, so their digests in turn stand for it.
        let digest = match &pieces {
            Some(pieces) => {
                let mut whole = Sha256::new();
                for (_, d) in pieces {
                    whole.update(d);
                }
                whole.finalize().into()
            }
            None => Sha256::digest(bytes).into(),
        };
        Self {
            text,
            json,
            pieces,
            digest,
        }
    }
}

/// A part of a file's new content: one of its old parts, or a new one.
enum Planned {
    Reuse(usize),
    New(Box<Part>),
}

/// A YAML stream cut before every `---` at the start of a line that is
/// followed by a space, a tab or the end of the line: YAML forbids such a
/// line inside any scalar or collection, so each piece is one document
/// (or none: comments, or nothing before the first `---`). None when a
/// line starts with a directive (`%`) or the end marker `...`, which tie
/// documents together in ways this does not follow, or when there are
/// more pieces than a file may have documents: the stream is then parsed
/// whole (which says so).
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut starts = vec![0];
    let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
    for at in line_starts {
        let line = &bytes[at..];
        if line.starts_with(b"%") || line.starts_with(b"...") {
            return None;
        }
        if at > 0
            && line.starts_with(b"---")
            && matches!(line.get(3), None | Some(b' ' | b'\t' | b'\r' | b'\n'))
        {
            if starts.len() > MAX_DOCUMENTS {
                return None;
            }
            starts.push(at);
        }
    }
    starts.push(text.len());
    Some(starts.windows(2).map(|w| &text[w[0]..w[1]]).collect())
}

/// What the items of a typed list (`ServiceList`, as the API server
/// writes it) carry no field for: the list's apiVersion, and its kind
/// without `List`.
fn item_defaults(list: &serde_json::Map<String, Value>) -> Option<(&str, &str)> {
    let kind = list.get("kind").and_then(Value::as_str)?;
    let kind = kind.strip_suffix("List").filter(|k| !k.is_empty())?;
    let api_version = list.get("apiVersion").and_then(Value::as_str);
    Some((api_version.unwrap_or_default(), kind))
}

/// A piece's parse: its document (none when empty) and cost, or None when
/// it is not valid alone ([`parse_piece`]).
type ParsedPiece = Option<(Option<Value>, Cost)>;

/// Pieces of a split file parsed ahead of their turn by helper threads
/// (one per core but the loader's, at most 3) while the loader's thread
/// converts them in order; when the piece it needs is not parsed yet, the
/// loader's thread parses the next one nobody took rather than wait. The
/// YAML parser is most of a large file's load (about 10 of 13 s for
/// 100,000 Services and their slices), and each piece parses on its own.
/// Nothing is parsed more than [`Self::WINDOW`] pieces ahead of the
/// conversion. Only pieces that no old part has the digest of are parsed
/// ahead (the others are reused, or parsed in their turn when their place
/// moved), so an edit of a few documents parses them in turn, on no other
/// thread; so does a document inserted near the top of a large file,
/// which moves every later one (none is reused, each is parsed in turn:
/// slower than a fresh load).
struct Ahead<'p> {
    pieces: &'p [(&'p str, [u8; 32])],
    /// The pieces to parse ahead, in order.
    todo: Vec<usize>,
    /// The next entry of `todo` nobody took.
    claimed: std::sync::atomic::AtomicUsize,
    progress: std::sync::Mutex<Progress>,
    changed: std::sync::Condvar,
}

/// Where the parses ahead stand.
#[derive(Default)]
struct Progress {
    /// Parses done, by entry of `todo`.
    done: HashMap<usize, ParsedPiece>,
    /// Entries of `todo` the loader asked for.
    taken: usize,
    /// Set when the loader is done: helpers stop.
    stop: bool,
}

impl<'p> Ahead<'p> {
    /// Fewer pieces to parse than this are parsed in turn.
    const MIN: usize = 64;
    /// How far parses may run ahead of the conversion.
    const WINDOW: usize = 1024;

    fn new(pieces: &'p [(&'p str, [u8; 32])], old: &[Part]) -> Self {
        let old: HashSet<[u8; 32]> = old.iter().filter_map(|p| p.digest).collect();
        Self {
            pieces,
            todo: (0..pieces.len())
                .filter(|i| !old.contains(&pieces[*i].1))
                .collect(),
            claimed: Default::default(),
            progress: Default::default(),
            changed: Default::default(),
        }
    }

    /// The helpers there should be: none for a few pieces.
    fn helpers(&self) -> usize {
        if self.todo.len() < Self::MIN {
            return 0;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) - 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next entry of `todo` to parse, when there is one within
    /// the window of the loader's progress `taken`.
    fn claim(&self, taken: usize) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let c = self.claimed.load(Ordering::Acquire);
        let free = c < self.todo.len() && c < taken + Self::WINDOW;
        (free
            && self
                .claimed
                .compare_exchange(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then_some(c)
    }

    /// Parses entry `c` of `todo`. A parse that panics is taken for a
    /// piece not valid alone: the loader then parses the file whole on its
    /// own thread (and meets the panic there) rather than wait for ever.
    fn parse(&self, c: usize) -> ParsedPiece {
        let text = self.pieces[self.todo[c]].0;
        std::panic::catch_unwind(|| parse_piece(text)).unwrap_or(None)
    }

    /// A helper: parses the pieces nobody took, in order, until none is
    /// left or the loader is done.
    fn help(&self) {
        use std::sync::atomic::Ordering;
        let mut progress = self.lock();
        loop {
            if progress.stop || self.claimed.load(Ordering::Acquire) >= self.todo.len() {
                return;
            }
            let Some(c) = self.claim(progress.taken) else {
                // Too far ahead (or raced): wait for the loader.
                progress = self
                    .changed
                    .wait(progress)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            };
            drop(progress);
            let parsed = self.parse(c);
            progress = self.lock();
            progress.done.insert(c, parsed);
            self.changed.notify_all();
        }
    }

    /// Piece `i`'s parse, when it is one to parse ahead. Pieces are asked
    /// for in order.
    fn take(&self, i: usize) -> Option<ParsedPiece> {
        let mut progress = self.lock();
        let k = progress.taken;
        if self.todo.get(k) != Some(&i) {
            return None;
        }
        progress.taken += 1;
        self.changed.notify_all();
        loop {
            if let Some(parsed) = progress.done.remove(&k) {
                return Some(parsed);
            }
            match self.claim(k + 1) {
                Some(c) => {
                    drop(progress);
                    let parsed = self.parse(c);
                    if c == k {
                        return Some(parsed);
                    }
                    progress = self.lock();
                    progress.done.insert(c, parsed);
                }
                // Piece k is being parsed by a helper.
                None => {
                    progress = self
                        .changed
                        .wait(progress)
                        .unwrap_or_else(|e| e.into_inner())
                }
            }
        }
    }
}

/// Tells an [`Ahead`]'s helpers to stop when dropped.
struct Stop<'a, 'p>(&'a Ahead<'p>);

impl Drop for Stop<'_, '_> {
    fn drop(&mut self) {
        self.0.lock().stop = true;
        self.0.changed.notify_all();
    }
}

/// The document of one piece of [`split_documents`] (none when empty)
/// and its cost, or None when it is not one valid document on its own or
/// uses anchors, aliases or merge keys (whose limits count across the
/// file): the file is then parsed whole, which says what is wrong.
fn parse_piece(text: &str) -> ParsedPiece {
    let report = std::rc::Rc::new(std::cell::RefCell::new(None));
    let sink = std::rc::Rc::clone(&report);
    let options = serde_saphyr::options! { with_snippet: false, budget: Some(budget()) }
        .with_budget_report(move |r| *sink.borrow_mut() = Some(r));
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options).ok()?;
    let r: serde_saphyr::budget::BudgetReport = report.borrow_mut().take()?;
    if r.breached.is_some()
        || r.aliases > 0
        || r.anchors > 0
        || r.merge_keys > 0
        || r.recorded_anchor_events > 0
        || docs.len() > 1
    {
        return None;
    }
    let cost = Cost {
        documents: r.documents,
        nodes: r.nodes,
        events: r.events,
        scalar_bytes: r.total_scalar_bytes,
    };
    Some((docs.into_iter().next(), cost))
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
    /// The parts of a file, or why it is not YAML at all: a part per
    /// document when the file splits into them (reusing the parts of `old`
    /// whose text and number did not change, taken out of it), else one for
    /// the whole file; with each, the index it had in `old` when reused.
    /// Nothing is taken out of `old` unless the file is read.
    fn parts(
        &self,
        path: &Path,
        content: Content<'_>,
        old: &mut [Part],
    ) -> Result<(Vec<Part>, Vec<Option<usize>>), String> {
        let text = content.text?;
        if content.json {
            let part = self.json(path, text)?;
            return Ok((vec![part], vec![None]));
        }
        let plan = content.pieces.and_then(|p| self.split(path, &p, old));
        if let Some(plan) = plan {
            return Ok(plan
                .into_iter()
                .map(|p| match p {
                    Planned::Reuse(q) => (std::mem::take(&mut old[q]), Some(q)),
                    Planned::New(part) => (*part, None),
                })
                .unzip());
        }
        let part = self.whole(path, text)?;
        Ok((vec![part], vec![None]))
    }

    /// The parts of a file that splits into documents each valid on its
    /// own, within the file's limits together; None otherwise.
    fn split(
        &self,
        path: &Path,
        pieces: &[(&str, [u8; 32])],
        old: &[Part],
    ) -> Option<Vec<Planned>> {
        let ahead = Ahead::new(pieces, old);
        std::thread::scope(|scope| {
            for _ in 0..ahead.helpers() {
                // A helper that could not start: the loader parses more.
                let _ = std::thread::Builder::new()
                    .name("file-parse".into())
                    .spawn_scoped(scope, || ahead.help());
            }
            // Helpers stop when the plan is made, or given up, or panicked.
            let _stop = Stop(&ahead);
            self.plan(path, pieces, old, &ahead)
        })
    }

    /// [`Self::split`]'s plan, with pieces parsed by `ahead`.
    fn plan(
        &self,
        path: &Path,
        pieces: &[(&str, [u8; 32])],
        old: &[Part],
        ahead: &Ahead<'_>,
    ) -> Option<Vec<Planned>> {
        let shown = path.display().to_string();
        let mut plan = Vec::with_capacity(pieces.len());
        let mut before = 0;
        let mut total = Cost::default();
        // Old parts are in document order, as are the pieces.
        let mut next = 0;
        for (i, &(piece, digest)) in pieces.iter().enumerate() {
            while old.get(next).is_some_and(|p| p.before < before) {
                next += 1;
            }
            let reused = old[next.min(old.len())..]
                .iter()
                .take_while(|p| p.before == before)
                .position(|p| p.digest == Some(digest))
                .map(|k| next + k);
            let (documents, cost) = match reused {
                Some(q) => {
                    next = q + 1;
                    plan.push(Planned::Reuse(q));
                    (old[q].documents, old[q].cost)
                }
                None => {
                    let parsed = ahead.take(i).unwrap_or_else(|| parse_piece(piece))?;
                    let part = self.piece(&shown, parsed, digest, before);
                    let counted = (part.documents, part.cost);
                    plan.push(Planned::New(Box::new(part)));
                    counted
                }
            };
            before += documents;
            total.add(cost);
        }
        total.within_limits().then_some(plan)
    }

    /// One piece of a split file, from what [`parse_piece`] made of it.
    fn piece(
        &self,
        shown: &str,
        (doc, cost): (Option<Value>, Cost),
        digest: [u8; 32],
        before: usize,
    ) -> Part {
        let mut part = Part {
            digest: Some(digest),
            before,
            documents: usize::from(doc.is_some()),
            cost,
            objects: FileObjects::default(),
        };
        if let Some(doc) = doc {
            self.document(&format!("{shown}#{}", before + 1), doc, &mut part.objects);
        }
        // Kept until the document changes: no room for more.
        let o = &mut part.objects;
        o.services.shrink_to_fit();
        o.slices.shrink_to_fit();
        o.exports.shrink_to_fit();
        o.errors.shrink_to_fit();
        o.warnings.shrink_to_fit();
        part
    }

    /// A whole file as one part, or why it is not YAML at all.
    fn whole(&self, path: &Path, text: &str) -> Result<Part, String> {
        let docs = parse_documents(text, budget())?;
        Ok(self.part_of(path, docs))
    }

    /// A `*.json` file as one part, read by `serde_json` within
    /// [`JSON_LIMITS`]. A file that is not JSON but is YAML (documents
    /// between `---` lines, a trailing comma, a comment) is read as YAML,
    /// as every manifest was before; when it is neither, the error is
    /// JSON's (with its line and column).
    ///
    /// The items of a `List` are converted as they are read, each dropped
    /// once converted, when the item names its own kind (as `kubectl get
    /// -o json` writes them, `items` before the list's `kind`) or the list's
    /// kind came first (as the API server writes a `ServiceList`); from the
    /// first item that can be neither, the rest wait for the end of the
    /// document, in order. A document that turns out not to be a list drops
    /// what its items made and is one object, as before.
    fn json(&self, path: &Path, text: &str) -> Result<Part, String> {
        if json_is_blank(text) {
            return Ok(Part::default());
        }
        let de = serde_json::Deserializer::from_str(text.trim_start_matches('\u{feff}'));
        match self.json_items(path, de) {
            Ok(part) => Ok(part),
            Err(JsonError::Limit(message)) => Err(message),
            Err(JsonError::Syntax(message)) => self.whole(path, text).map_err(|_| message),
        }
    }

    /// A `*.json` file read from disk as it is parsed, so that an export of
    /// hundreds of megabytes is not held whole beside what it converts to
    /// (the text of 100,000 Services as a `List` is 224 MB, more than the
    /// objects it makes), and hashed as it is read. A file that starts with
    /// nothing but blanks (empty, or all but empty) or is not JSON is read
    /// whole, from the same open file, and goes the way of [`Self::json`].
    fn json_file(&self, path: &Path) -> io::Result<Fetched> {
        use io::{BufRead as _, Read as _, Seek as _};
        const BOM: &[u8] = "\u{feff}".as_bytes();
        let file = std::fs::File::open(path)?;
        let whole = |mut file: &std::fs::File| -> io::Result<Fetched> {
            file.seek(io::SeekFrom::Start(0))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(Fetched::Bytes(bytes))
        };
        let mut hasher = Sha256::new();
        let hashing = Hashing {
            inner: &file,
            hasher: &mut hasher,
        };
        // Given by value: `serde_json` reads a byte at a time, which
        // `BufReader` serves from its buffer only when it is not behind a
        // reference (a tenth of the load's time otherwise).
        let mut reader = io::BufReader::with_capacity(1 << 16, hashing);
        while reader.fill_buf()?.starts_with(BOM) {
            reader.consume(BOM.len());
        }
        if reader.fill_buf()?.iter().all(|b| b" \t\r\n".contains(b)) {
            drop(reader);
            return whole(&file);
        }
        let parsed = self.json_items(path, serde_json::Deserializer::from_reader(reader));
        Ok(match parsed {
            // Parsed whole: the reader read to the end and hashed all of it.
            Ok(part) => Fetched::Json(hasher.finalize().into(), Ok(Box::new(part))),
            // Stopped short: the rest is hashed from where it stopped.
            Err(JsonError::Limit(message)) => {
                let mut rest = Hashing {
                    inner: &file,
                    hasher: &mut hasher,
                };
                io::copy(&mut rest, &mut io::sink())?;
                Fetched::Json(hasher.finalize().into(), Err(message))
            }
            Err(JsonError::Syntax(_)) => whole(&file)?,
        })
    }

    /// The documents of a JSON input, past any byte-order mark, into one
    /// part: the items of a `List` converted as they are read (see
    /// [`Self::json`]).
    fn json_items<'de, R: serde_json::de::Read<'de>>(
        &self,
        path: &Path,
        de: serde_json::Deserializer<R>,
    ) -> Result<Part, JsonError> {
        let mut streamed: Vec<Streamed> = Vec::new();
        let mut sink = |document: usize, head: &serde_json::Map<String, Value>, i, item: Value| {
            if streamed.len() <= document {
                streamed.resize_with(document + 1, Streamed::default);
            }
            let s = &mut streamed[document];
            if s.first_kept.is_some() {
                return Some(item);
            }
            let head_kind = head.get("kind").and_then(Value::as_str);
            let list = head_kind.filter(|k| k.ends_with("List"));
            let own = ["apiVersion", "kind"]
                .iter()
                .all(|f| item.get(f).is_some_and(Value::is_string));
            if (head_kind.is_some() && list.is_none()) || !(own || list.is_some()) {
                s.first_kept = Some(i);
                return Some(item);
            }
            let defaults = item_defaults(head);
            let at = format!("{}#{}", path.display(), document + 1);
            let place = Place {
                at: &at,
                item: Some(i),
            };
            self.object(&place, &item, defaults, &mut s.objects);
            s.taken += 1;
            None
        };
        let docs = parse_json_items(de, JSON_LIMITS, &mut sink)?;
        Ok(self.part_of_streamed(path, docs, streamed))
    }

    /// [`Self::part_of`] for a JSON file whose lists' items were (partly)
    /// converted as they were read.
    fn part_of_streamed(&self, path: &Path, docs: Vec<Value>, mut streamed: Vec<Streamed>) -> Part {
        let mut part = Part {
            documents: docs.len(),
            ..Part::default()
        };
        for (n, doc) in docs.into_iter().enumerate() {
            let at = format!("{}#{}", path.display(), n + 1);
            let s = streamed.get_mut(n).map(std::mem::take).unwrap_or_default();
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
            if s.taken > 0 && kind.ends_with("List") {
                part.objects.append(s.objects);
                self.list_items(&at, doc, s.first_kept.unwrap_or(0), &mut part.objects);
            } else {
                // Nothing taken, or not a list after all: what its items
                // made is dropped and the document is read as before.
                self.document(&at, doc, &mut part.objects);
            }
        }
        part
    }

    /// The objects of a file's documents, as one part.
    fn part_of(&self, path: &Path, docs: Vec<Value>) -> Part {
        let mut part = Part {
            documents: docs.len(),
            ..Part::default()
        };
        for (n, doc) in docs.into_iter().enumerate() {
            let at = format!("{}#{}", path.display(), n + 1);
            self.document(&at, doc, &mut part.objects);
        }
        part
    }

    /// Kinds Kubernetes has but Switchyard does not read (an export holds
    /// Deployments, ConfigMaps...): one line per file, not one per object.
    fn kinds(&self, path: &Path, parts: &[Part]) -> Option<ObjectError> {
        let mut other_kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for part in parts {
            for (kind, n) in &part.objects.other_kinds {
                *other_kinds.entry(kind).or_default() += n;
            }
        }
        if other_kinds.is_empty() {
            return None;
        }
        let kinds: Vec<String> = other_kinds
            .iter()
            .map(|(k, n)| {
                if *n == 1 {
                    (*k).to_owned()
                } else {
                    format!("{k} x{n}")
                }
            })
            .collect();
        Some(self.error(
            &path.display().to_string(),
            String::new(),
            format!(
                "ignored (only v1 Service and discovery.k8s.io/v1 EndpointSlice are read): {}",
                kinds.join(", ")
            ),
        ))
    }

    fn document(&self, at: &str, doc: Value, out: &mut FileObjects) {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let list = kind.ends_with("List");
        if !list || !doc.get("items").is_some_and(Value::is_array) {
            self.object(&Place { at, item: None }, &doc, None, out);
            return;
        }
        self.list_items(at, doc, 0, out);
    }

    /// The items of list `doc` (those not converted as they were read: the
    /// first of them is item `first` of the list), each dropped once
    /// converted (a large List's values would otherwise all stay until the
    /// last item is).
    fn list_items(&self, at: &str, mut doc: Value, first: usize, out: &mut FileObjects) {
        let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
            return;
        };
        let defaults = doc.as_object().and_then(item_defaults);
        for (i, item) in items.into_iter().enumerate() {
            let place = Place {
                at,
                item: Some(first + i),
            };
            self.object(&place, &item, defaults, out);
        }
    }

    fn object(
        &self,
        place: &Place<'_>,
        obj: &Value,
        defaults: Option<(&str, &str)>,
        out: &mut FileObjects,
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
                let (svc, unknown) = match typed::<core::Service>(obj) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        return out.errors.push(self.unparsable(place, object, &located, e));
                    }
                };
                self.unknown_fields(place, object.as_deref(), unknown, &located, out);
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
                let (slice, unknown) = match typed::<discovery::EndpointSlice>(obj) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        return out.errors.push(self.unparsable(place, object, &located, e));
                    }
                };
                self.unknown_fields(place, object.as_deref(), unknown, &located, out);
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
                    *out.other_kinds
                        .entry(format!("{api_version} {kind}"))
                        .or_default() += 1;
                }
            },
        }
    }

    /// Warns about every field of an object that its Kubernetes type does
    /// not have ([`typed`]): Kubernetes would refuse or warn about them
    /// (kubectl's strict decoding), and here they are silently without effect.
    fn unknown_fields(
        &self,
        place: &Place<'_>,
        object: Option<&str>,
        unknown: Vec<String>,
        located: &dyn Fn(&str) -> String,
        out: &mut FileObjects,
    ) {
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
    fn unknown_fields_are_named_by_path_and_nulls_do_not_count() {
        let obj = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "labelz": {"a": "b"}},
            "spec": {
                "clusterIp": "10.0.0.1",
                "typo": null,
                "ports": [{"port": 80}, {"port": 81, "portz": 8080}]
            },
            "extra": 1
        });
        let (svc, unknown) = typed::<core::Service>(&obj).expect("a Service");
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert_eq!(
            unknown,
            [
                "extra",
                "metadata.labelz",
                "spec.clusterIp",
                "spec.ports[1].portz"
            ]
        );
        let (_, unknown) = typed::<core::Service>(&serde_json::json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}
        }))
        .expect("a Service");
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    /// A loader over `dir` as the source runs one (no watcher).
    fn loader(dir: &Path) -> Loader {
        Loader::new(
            "file:test".into(),
            vec![dir.to_path_buf()],
            "default".into(),
            false,
            None,
            None,
        )
    }

    fn svc(ns: &str, name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: {ns}, name: {name}}}\nspec:\n  ports: [{{port: {port}}}]\n"
        )
    }

    fn slice(ns: &str, name: &str, service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: {ns}\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nendpoints:\n- addresses: [\"{ip}\"]\n"
        )
    }

    fn docs(parts: &[String]) -> String {
        parts
            .iter()
            .map(|p| format!("---\n{}\n", p.trim_end()))
            .collect()
    }

    #[test]
    fn documents_parsed_on_other_threads_keep_their_numbers() {
        let mut documents: Vec<String> = (0..150)
            .map(|i| svc("shop", &format!("s{i}"), 80))
            .collect();
        documents[89] = "just text".into();
        documents.insert(100, "# nothing".into());
        let (state, path, _d) = load_one("a.yaml", &docs(&documents));
        assert_eq!(state.services.len(), 149);
        let [e] = state.errors.as_slice() else {
            panic!("{:?}", state.errors);
        };
        assert_eq!(e.object, format!("{}#90", path.display()));
        // A document not valid alone (an alias) far down: the file is
        // parsed whole, as one, with the same objects.
        documents.push("x: &a 1\ny: *a\n".into());
        let (whole, _, _w) = load_one("a.yaml", &docs(&documents));
        assert_eq!(whole.services, state.services);
        // ... or first, in a batch parsed ahead: what was parsed of the
        // rest is dropped.
        let mut many: Vec<String> = (0..1500)
            .map(|i| svc("shop", &format!("m{i}"), 80))
            .collect();
        many.insert(0, "x: &a 1\ny: *a\n".into());
        let (whole, _, _w) = load_one("a.yaml", &docs(&many));
        assert_eq!(whole.services.len(), 1500);
    }

    #[test]
    fn every_edit_gives_the_state_a_fresh_load_gives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        // More documents than are parsed in turn: a fresh load parses them
        // on other threads too.
        let mut base: Vec<String> = (0..40)
            .flat_map(|i| {
                [
                    svc("shop", &format!("s{i}"), 80),
                    slice(
                        "shop",
                        &format!("s{i}-1"),
                        &format!("s{i}"),
                        &format!("10.0.0.{}", i + 1),
                    ),
                ]
            })
            .collect();
        base.push(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {namespace: shop, name: s1}\n".into(),
        );
        base.push("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into());
        let mut steps: Vec<(&str, String, String)> = Vec::new();
        let edited = |f: &dyn Fn(&mut Vec<String>)| {
            let mut d = base.clone();
            f(&mut d);
            docs(&d)
        };
        let small = svc("shop", "other", 81);
        steps.push(("first load", docs(&base), small.clone()));
        steps.push((
            "one endpoint changed",
            edited(&|d| d[3] = slice("shop", "s1-1", "s1", "10.9.9.9")),
            small.clone(),
        ));
        steps.push((
            "a port made invalid",
            edited(&|d| d[2] = svc("shop", "s1", 0)),
            small.clone(),
        ));
        steps.push((
            "valid again",
            edited(&|d| d[2] = svc("shop", "s1", 8080)),
            small.clone(),
        ));
        steps.push((
            "a document that is no object",
            edited(&|d| d[4] = "just text".into()),
            small.clone(),
        ));
        steps.push((
            "defined twice in one file",
            edited(&|d| d[6] = svc("shop", "s0", 90)),
            small.clone(),
        ));
        steps.push((
            "a document inserted first",
            edited(&|d| d.insert(0, svc("shop", "new", 1))),
            small.clone(),
        ));
        steps.push((
            "an empty document inserted",
            edited(&|d| d.insert(1, "# nothing".into())),
            small.clone(),
        ));
        steps.push((
            "the first document removed",
            edited(&|d| {
                d.remove(0);
            }),
            small.clone(),
        ));
        steps.push((
            "the later file defines s2 again",
            docs(&base),
            format!("{small}---\n{}", svc("shop", "s2", 99)),
        ));
        steps.push((
            "and its slice",
            docs(&base),
            docs(&[small.clone(), slice("shop", "s2-1", "other", "10.7.7.7")]),
        ));
        steps.push((
            "the first file drops s2",
            edited(&|d| {
                d.drain(4..6);
            }),
            docs(&[
                small.clone(),
                svc("shop", "s2", 99),
                slice("shop", "s2-1", "other", "10.7.7.7"),
            ]),
        ));
        steps.push((
            "and takes it back",
            docs(&base),
            docs(&[small.clone(), svc("shop", "s2", 99)]),
        ));
        steps.push((
            "broken YAML keeps the last content",
            format!("{}---\na: [1\n", docs(&base)),
            small.clone(),
        ));
        steps.push(("fixed", edited(&|d| d.swap(0, 2)), small.clone()));
        steps.push((
            "a List",
            edited(&|d| {
                d[0] = format!(
                    "apiVersion: v1\nkind: List\nitems:\n- {}",
                    svc("shop", "l", 1).replace('\n', "\n  ")
                )
            }),
            small.clone(),
        ));
        steps.push((
            "the same bytes again",
            edited(&|d| {
                d[0] = format!(
                    "apiVersion: v1\nkind: List\nitems:\n- {}",
                    svc("shop", "l", 1).replace('\n', "\n  ")
                )
            }),
            small.clone(),
        ));
        steps.push((
            "anchors",
            format!("{}---\nx: &a 1\ny: *a\n", docs(&base)),
            small.clone(),
        ));
        steps.push(("back", docs(&base), small.clone()));
        let mut incremental = loader(dir.path());
        let mut before = SourceState::default();
        for (what, text_a, text_b) in steps {
            std::fs::write(&a, text_a).expect("write");
            std::fs::write(&b, text_b).expect("write");
            let got = incremental.reload();
            if what.starts_with("broken") {
                // A fresh load has nothing to keep: the last state, and why.
                assert_eq!(got.services, before.services, "{what}");
                assert_eq!(got.slices, before.slices, "{what}");
                assert!(
                    got.errors
                        .iter()
                        .any(|e| e.message.starts_with("not valid YAML")),
                    "{what}: {:?}",
                    got.errors
                );
                before = got;
                continue;
            }
            let fresh = loader(dir.path()).reload();
            assert_eq!(got.errors, fresh.errors, "{what}");
            assert_eq!(got.warnings, fresh.warnings, "{what}");
            assert_eq!(got.exports, fresh.exports, "{what}");
            assert_eq!(got.services, fresh.services, "{what}");
            assert_eq!(got.slices, fresh.slices, "{what}");
            assert_eq!(got, fresh, "{what}");
            // What did not change keeps its Arc (the index diffs by pointer).
            for s in got.services.iter() {
                if let Some(old) = before.services.get(&s.key).filter(|old| ***old == **s) {
                    assert!(Arc::ptr_eq(s, old), "{what}: {:?}", s.key);
                }
            }
            for s in got.slices.iter() {
                let key = (s.service.clone(), s.slice.name.clone());
                if let Some(old) = before.slices.get(&key).filter(|old| ***old == **s) {
                    assert!(Arc::ptr_eq(s, old), "{what}: {key:?}");
                }
            }
            before = got;
        }
        std::fs::remove_file(&a).expect("rm");
        assert_eq!(
            incremental.reload(),
            loader(dir.path()).reload(),
            "a file removed"
        );
    }

    #[test]
    fn unchanged_documents_keep_their_objects_and_only_the_edited_one_is_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        let text = |port: u16| {
            docs(&[
                svc("x", "one", 80),
                svc("x", "two", port),
                svc("x", "three", 80),
            ])
        };
        std::fs::write(&a, text(80)).expect("write");
        let mut l = loader(dir.path());
        let first = l.reload();
        std::fs::write(&a, text(81)).expect("write");
        let second = l.reload();
        let changed: Vec<_> = first
            .services
            .changed_keys(&second.services)
            .map(|k| k.name.clone())
            .collect();
        assert_eq!(changed, ["two"]);
        let file = &l.files[&a];
        assert_eq!(file.parts.len(), 3, "a part per document");
        assert!(file.parts.iter().all(|p| p.digest.is_some()));
    }

    #[test]
    fn a_write_after_the_timestamps_settled_is_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, svc("x", "one", 80)).expect("write");
        let mut l = loader(dir.path());
        l.reload();
        std::thread::sleep(RACY + std::time::Duration::from_millis(100));
        assert_eq!(
            l.reload().services.len(),
            1,
            "read again: it was read too soon after its write"
        );
        // The same length, so only the timestamps and inode tell.
        std::fs::write(&a, svc("x", "two", 80)).expect("write");
        let state = l.reload();
        assert!(
            state
                .services
                .get(&ServiceKey::new("default", "x", "two"))
                .is_some()
        );
    }

    #[test]
    fn the_document_limit_holds_for_a_file_read_a_document_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "---\na: 1\n".repeat(MAX_DOCUMENTS + 1);
        std::fs::write(dir.path().join("a.yaml"), &text).expect("write");
        let state = loader(dir.path()).reload();
        let whole = parse_documents(&text, budget()).expect_err("over the limit");
        assert!(whole.contains("documents; the limit is"), "{whole}");
        assert_eq!(
            state
                .errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            [whole.as_str()]
        );
    }

    #[test]
    fn a_stream_splits_only_where_its_documents_start() {
        let cases = [
            "a: 1\n---\nb: 2\n",
            "--- |\n  foo\n---\nbar\n",
            "--- |\nfoo\n---\nbar\n",
            "--- >\nfoo\n--- \nbar\n",
            "foo\n---\nbar\n",
            "a: \"x\n---\ny\"\n",
            "a: 'x\n---\ny'\n",
            "[1,\n---\n2]\n",
            "{a: 1,\n---\n}\n",
            "a: 1\n---a: 2\n",
            "---\n---\na: 1\n",
            "# c\n---\n\n---\na: 1\n--- \nb: 2\n---\tc\n---\r\nd: 4\r\n",
            "key: |\n  line\n---\nz: 1\n",
            "a: 1\r---\rb: 2\r",
            "---a\n---b\n",
            "\u{feff}a: 1\n---\nb: 2\n",
            "a: &x 1\n---\nb: *x\n",
            "%YAML 1.2\n---\na: 1\n",
            "a: 1\n...\n---\nb: 2\n",
            "--- !!str\n---\n~\n---\nnull\n",
        ];
        for text in cases {
            let whole = parse_documents(text, budget());
            let split = split_documents(text).and_then(|pieces| {
                pieces
                    .into_iter()
                    .map(parse_piece)
                    .collect::<Option<Vec<_>>>()
            });
            if let Some(pieces) = split {
                let docs: Vec<Value> = pieces.into_iter().filter_map(|(d, _)| d).collect();
                assert_eq!(Ok(docs), whole, "{text:?}");
            }
        }
    }

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

    /// `text` as the only file of a fresh directory, named `name`, loaded.
    fn load_one(name: &str, text: &str) -> (SourceState, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (loader(dir.path()).reload(), path, dir)
    }

    /// Errors and warnings without their source or place (the file's path
    /// and the document number differ between a YAML stream and a List).
    fn said(errors: &[ObjectError]) -> Vec<(String, String, String)> {
        errors
            .iter()
            .map(|e| {
                let message = e.message.split(" (in ").next().unwrap_or_default();
                (e.object.clone(), e.field.clone(), message.to_owned())
            })
            .collect()
    }

    #[test]
    fn a_json_file_loads_the_state_its_yaml_twin_does() {
        let objects = [
            svc("shop", "web", 80),
            slice("shop", "web-1", "web", "10.0.0.1"),
            // A field no Service has: a warning either way.
            format!("{}  portz: 1\n", svc("shop", "typo", 81)),
            // A type error: named by its field either way.
            svc("shop", "bad", 80).replace("port: 80", "port: \"x\""),
        ];
        let values: Vec<Value> = objects
            .iter()
            .map(|o| serde_saphyr::from_str::<Value>(o).expect("yaml"))
            .collect();
        let (yaml, _, _y) = load_one("a.yaml", &docs(&objects));
        assert_eq!(yaml.services.len(), 2, "{:?}", yaml.errors);
        assert_eq!(yaml.slices.len(), 1);
        assert_eq!(said(&yaml.warnings).len(), 1);
        assert_eq!(said(&yaml.errors).len(), 1);
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values});
        let single = serde_json::to_string_pretty(&values[0]).expect("json");
        let stream: String = values.iter().map(|v| format!("{v}\n")).collect();
        let dashes: String = values.iter().map(|v| format!("---\n{v}\n")).collect();
        let pretty = serde_json::to_string_pretty(&list).expect("json");
        for (what, text) in [
            ("a List", pretty.clone()),
            // Files are read as a stream, past byte-order marks; one that
            // starts with more blanks than a read holds is read whole.
            (
                "a List after byte-order marks",
                format!("\u{feff}\u{feff}{pretty}"),
            ),
            (
                "a List after 70,000 blanks",
                format!("{}\n{pretty}", " ".repeat(70_000)),
            ),
            ("values one after another", stream),
            ("values between --- lines (read as YAML)", dashes),
        ] {
            let (json, path, _j) = load_one("a.json", &text);
            assert_eq!(json.services, yaml.services, "{what}");
            assert_eq!(json.slices, yaml.slices, "{what}");
            assert_eq!(said(&json.errors), said(&yaml.errors), "{what}");
            assert_eq!(said(&json.warnings), said(&yaml.warnings), "{what}");
            let shown = path.display().to_string();
            assert!(
                json.warnings.iter().all(|w| w.message.contains(&shown)),
                "{what}: {:?}",
                json.warnings
            );
        }
        let (one, _, _o) = load_one("one.JSON", &single);
        assert_eq!(one.services.len(), 1);
        assert!(one.errors.is_empty(), "{:?}", one.errors);
        let (empty, _, _e) = load_one("empty.json", " \n");
        assert!(empty.errors.is_empty() && empty.services.is_empty());
        // Bytes that are not UTF-8 in a string: said as such, as in YAML.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = single.into_bytes();
        let at = bytes.iter().position(|b| *b == b'w').expect("a name");
        bytes[at] = 0xff;
        std::fs::write(dir.path().join("bad.json"), &bytes).expect("write");
        let bad = loader(dir.path()).reload();
        let [e] = bad.errors.as_slice() else {
            panic!("{:?}", bad.errors);
        };
        assert!(e.message.starts_with("not UTF-8"), "{e:?}");
    }

    #[test]
    fn a_json_file_is_used_again_only_when_its_bytes_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        let list = |port: u16| {
            let item: Value = serde_saphyr::from_str(&svc("shop", "web", port)).expect("yaml");
            serde_json::to_string_pretty(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [item]}),
            )
            .expect("json")
        };
        let port = |s: &SourceState| s.services.iter().next().map(|s| s.ports[0].port);
        let mut loader = loader(dir.path());
        std::fs::write(&path, list(80)).expect("write");
        let first = loader.reload();
        assert_eq!(port(&first), Some(80));
        // The same bytes again: the same objects.
        std::fs::write(&path, list(80)).expect("write");
        let again = loader.reload();
        let (a, b) = (first.services.iter().next(), again.services.iter().next());
        assert!(Arc::ptr_eq(a.expect("one"), b.expect("one")));
        std::fs::write(&path, list(81)).expect("write");
        assert_eq!(port(&loader.reload()), Some(81));
        // Broken: the last content stays, and why is said.
        let text = list(82);
        std::fs::write(&path, &text[..text.len() / 2]).expect("write");
        let broken = loader.reload();
        assert_eq!(port(&broken), Some(81));
        assert!(
            broken
                .errors
                .iter()
                .any(|e| e.message.starts_with("not valid JSON")),
            "{:?}",
            broken.errors
        );
        std::fs::write(&path, list(82)).expect("write");
        let fixed = loader.reload();
        assert_eq!((port(&fixed), fixed.errors.len()), (Some(82), 0));
        // YAML in a `.json` file: read as YAML.
        std::fs::write(&path, docs(&[svc("shop", "web", 83)])).expect("write");
        assert_eq!(port(&loader.reload()), Some(83));
    }

    #[test]
    fn a_json_lists_items_are_read_in_any_key_order() {
        let svc = |name: &str, kind: bool| {
            let head = if kind {
                r#""apiVersion": "v1", "kind": "Service", "#
            } else {
                ""
            };
            format!(
                r#"{{{head}"metadata": {{"name": "{name}", "namespace": "shop"}}, "spec": {{"ports": [{{"port": 80}}]}}}}"#
            )
        };
        let names = |s: &SourceState| -> Vec<String> {
            let mut n: Vec<String> = s.services.iter().map(|s| s.key.to_string()).collect();
            n.sort();
            n
        };
        // As the API server writes a typed list: its kind first, items without theirs.
        let typed = format!(
            r#"{{"kind": "ServiceList", "apiVersion": "v1", "items": [{}, {}]}}"#,
            svc("a", false),
            svc("b", false)
        );
        // The list's kind after its items: those without a kind wait for it,
        // and so does every item after the first of them (in order).
        let late = format!(
            r#"{{"apiVersion": "v1", "items": [{}, {}, {}], "kind": "ServiceList"}}"#,
            svc("a", true),
            svc("b", false),
            svc("c", true).replace("\"port\": 80", "\"port\": \"x\"")
        );
        for (what, text) in [("typed", &typed), ("kind last", &late)] {
            let (state, _, _d) = load_one("l.json", text);
            assert_eq!(
                names(&state),
                ["default/shop/a", "default/shop/b"],
                "{what}: {:?}",
                state.errors
            );
        }
        // The bad item is named by its place in the list.
        let (state, _, _d) = load_one("l.json", &late);
        let [e] = state.errors.as_slice() else {
            panic!("one error: {:?}", state.errors)
        };
        assert_eq!(
            (e.object.as_str(), e.field.as_str()),
            ("Service shop/c", "spec.ports[0].port"),
            "{e:?}"
        );
        assert!(e.message.contains("#1 items[2]"), "{e:?}");
        // Not a list after all: what its items made is dropped, and its
        // `items` is an unknown field of the Service it is.
        let not_a_list = format!(
            r#"{{"apiVersion": "v1", "items": [{}], "kind": "Service", "metadata": {{"name": "x", "namespace": "shop"}}, "spec": {{"ports": [{{"port": 80}}]}}}}"#,
            svc("inner", true)
        );
        let (state, _, _d) = load_one("l.json", &not_a_list);
        assert_eq!(names(&state), ["default/shop/x"], "{:?}", state.errors);
        assert!(
            state.warnings.iter().any(|w| w.field == "items"),
            "{:?}",
            state.warnings
        );
    }

    #[test]
    fn a_json_syntax_error_names_the_file_and_where() {
        let text = "{\"apiVersion\": \"v1\",\n \"kind\": \"Service\",\n \"metadata\": {\"name\": \"a\"}}\n}\n";
        let (state, path, _d) = load_one("a.json", text);
        let [e] = state.errors.as_slice() else {
            panic!("{:?}", state.errors);
        };
        assert_eq!(e.object, path.display().to_string());
        assert_eq!(
            e.message,
            "not valid JSON: expected value at line 4 column 1"
        );
        // Not JSON, nor YAML: still JSON's error.
        let (state, _, _d) = load_one("b.json", "{\"a\": [1, 2}\n");
        assert!(
            state.errors[0].message.starts_with("not valid JSON: ")
                && state.errors[0].message.contains("line 1 column"),
            "{:?}",
            state.errors
        );
        // A key twice: refused, as YAML refuses it.
        assert!(parse_documents("kind: a\nkind: b\n", budget()).is_err());
        let (state, _, _d) = load_one("c.json", "{\"kind\": \"Service\",\n \"kind\": \"List\"}\n");
        assert_eq!(
            said(&state.errors)[0].2,
            "not valid JSON: duplicate key \"kind\" at line 2 column 7"
        );
        // Nested deeper than serde_json allows: refused, not overflowed.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(
            matches!(parse_json(&deep, JSON_LIMITS), Err(JsonError::Syntax(m)) if m.contains("recursion limit"))
        );
    }

    #[test]
    fn a_json_file_over_a_limit_says_the_limit() {
        let (state, path, _d) = load_one("a.json", &"1\n".repeat(MAX_DOCUMENTS + 1));
        assert_eq!(
            said(&state.errors),
            [(
                path.display().to_string(),
                String::new(),
                format!(
                    "the file has more than {MAX_DOCUMENTS} documents; the limit is {MAX_DOCUMENTS} per file; split it into several files"
                )
            )]
        );
        let small = |nodes, scalar_bytes| JsonLimits {
            documents: 3,
            nodes,
            scalar_bytes,
        };
        let text = r#"{"items": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}"#;
        assert_eq!(
            parse_json(text, small(10, 1000)),
            Err(JsonError::Limit(
                "the file has more than 10 JSON nodes; the limit is 10 per file; split it into several files".into()
            ))
        );
        assert_eq!(parse_json(text, small(14, 1000)).map(|d| d.len()), Ok(1));
        assert!(
            matches!(parse_json(r#"{"a": "0123456789"}"#, small(10, 10)), Err(JsonError::Limit(m)) if m.contains("more than 10 bytes of text; the limit is 10 bytes"))
        );
        assert!(
            matches!(parse_json("1 2 3 4", small(10, 10)), Err(JsonError::Limit(m)) if m.contains("more than 3 documents"))
        );
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
