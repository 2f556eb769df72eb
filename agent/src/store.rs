//! The last good state on disk, in sled.
//!
//! Layout of the database under `--state-dir`, and the file beside it:
//!
//! ```text
//!   state.sled  tree "resources":  name -> frame(v1::Resource)   one entry per resource
//!               key  "meta":       frame(Meta)   version, count, generation, checksum
//!               tree "previous":   G name -> frame or "" (absent)   what update G replaced,
//!                                  G -> the meta of generation G - 1 (G: 8 bytes, big-endian;
//!                                  nothing for a first state: there is no generation before)
//!   state.generation               frame(Meta) of the newest generation written
//! ```
//!
//! Every value is a frame: `b"SWYS"`, format version (u16 BE), payload
//! length (u32 BE), CRC-32 of the payload (u32 BE), payload (protobuf). An
//! update (its changed and removed resources, what they replaced, and the
//! new `meta`) is written in one sled transaction over the three trees and
//! flushed before the agent ACKs: a crash at any point leaves exactly the
//! old or exactly the new state, never new resources labelled with the old
//! version (`integration-tests/tests/crash.rs` kills a real agent around
//! its saves to check it). A first state (no `meta` stored) is the one
//! exception: its resources go in batches and its `meta` last, since one
//! transaction of 100,000 resources keeps every tree node it replaces
//! until it ends (the agent's peak at 100,000 Services was 913 MiB, 572
//! MiB so). Cut short, it is resources alone, with no generation file
//! beside them: the next start clears them and starts empty (nothing was
//! ACKed, nothing older is lost). `crash.rs` kills new nodes during their
//! first state too; the unit test
//! `tests::a_first_state_goes_in_batches_and_keeps_no_previous_generation`
//! cuts one short between its batches on purpose.
//!
//! Each save is a new generation. Its `meta` carries the generation and a
//! checksum of the whole state (the wrapping sum of a SHA-256 digest of
//! each resource's name and version, kept up to date by what each update
//! changes). Loading checks the magic, the format version, the length and
//! CRC of every frame, the resource count, the checksum and each
//! resource's validity. When the newest generation fails a check, the
//! previous one is made from it and the "previous" tree and checked the
//! same way; if it passes it is served, and `/status` `discarded_state`
//! says so. sled checks its own log too, and on damage it recovers the
//! last consistent point, silently: an older generation, or nothing. So
//! after each save the generation written also goes to `state.generation`,
//! outside sled (written and renamed, not synced: it can only be older
//! than sled's, never newer, unless sled lost what it had flushed), and a
//! store older than that file is said to be rolled back. Nothing found is
//! ever served as the newest state without saying so; a database sled
//! cannot open is moved aside, never a crash loop.
//!
//! Once a write fails (a full disk: ENOSPC), sled keeps that error and
//! fails every later operation, even after space comes back. So a failed
//! write marks the store broken, and the next save closes the database,
//! opens it again and writes the whole state, not just the change: the
//! agent recovers on its first retry once the disk has room. The same
//! whole write follows a start that served a previous generation.
//!
//! Details that matter: the payload length is bounded at 64 MiB; loading
//! also checks that each resource is stored under its own name and the
//! resource count against `meta` (a torn write). The `previous` entries of
//! older updates are removed after each save, off the ACK's path, and
//! after a save that wrote or removed 1,000 entries or more, what sled
//! replaced is freed there at once (its collector would take dozens of
//! updates). What
//! `discarded_state` says: "the newest generation is damaged (...); serving
//! the previous one, generation N (version V, R resources)"; "rolled back:
//! the store holds generation N (...), but generation M (...) was
//! written"; an empty store where a generation was written is discarded
//! with "lost" in the reason; any other failure discards the whole state
//! and the agent resyncs in full (a database sled cannot open goes to
//! `state.sled.corrupt-<unix seconds>`). The retry after a failed write is
//! the client's retry of the NACKed update (0.5 s on, doubling).
//!
//! Tested: `tests/crash.rs` SIGKILLs a real `sy_agent` 16 times around
//! saves that change every resource and checks each time that the store
//! holds exactly a snapshot the control plane published; the unit test
//! `tests::flipped_bytes_and_truncated_sled_files_are_always_said` flips
//! bytes at 24 places and cuts each of sled's files at five lengths: in
//! every case the agent serves the newest state or says what it found (58
//! cases here, 55 said, 3 harmless; the flipped byte that made agents
//! start empty, or serve 15 of 100 Services stale, without a word, is why
//! `state.generation` exists); `tests/hardening.rs` fills a 16 MiB tmpfs
//! under a running agent, then frees it.

use std::path::{Path, PathBuf};

use prost::Message;
use switchyard_proto::v1;

use crate::state::{AgentState, ChangeSet};

const MAGIC: &[u8; 4] = b"SWYS";
/// Bumped whenever the frame or payload layout changes incompatibly.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 4 + 2 + 4 + 4;
/// Frames larger than this are corrupt by definition (a Service with
/// thousands of endpoints is well below it).
const MAX_FRAME: usize = 64 << 20;
const META_KEY: &[u8] = b"meta";
const RESOURCES_TREE: &[u8] = b"resources";
const PREVIOUS_TREE: &[u8] = b"previous";
/// The newest generation written, beside the database.
const GENERATION_FILE: &str = "state.generation";

/// The metadata frame's payload.
#[derive(Clone, PartialEq, prost::Message)]
struct Meta {
    #[prost(string, tag = "1")]
    snapshot_version: String,
    #[prost(uint64, tag = "2")]
    resource_count: u64,
    #[prost(int64, tag = "3")]
    saved_at_unix_nanos: i64,
    /// 1 for the first save, one more for each (0: written before
    /// generations were kept; no checksum then).
    #[prost(uint64, tag = "4")]
    generation: u64,
    /// The sum of [`digest`] over the state's resources.
    #[prost(fixed64, tag = "5")]
    checksum: u64,
}

impl Meta {
    fn describe(&self) -> String {
        format!(
            "generation {} (version {}, {} resources)",
            self.generation, self.snapshot_version, self.resource_count
        )
    }
}

/// One resource's part of a state's checksum: the first 8 bytes of
/// SHA-256 over its name and version (stable across builds and hosts).
fn digest(name: &str, version: &str) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(version.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The checksum of a whole state.
fn checksum(state: &AgentState) -> u64 {
    state.resources.iter().fold(0, |sum, (name, held)| {
        sum.wrapping_add(digest(name, &held.version))
    })
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("state database {path}: {source}")]
    Db {
        /// The database directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A fault injected by [`Store::fail_next_saves`] (tests).
    #[error("state database {path}: injected failure (a full disk)")]
    Injected {
        /// The database directory.
        path: PathBuf,
    },
    /// The database could not be opened again after a failed write.
    #[error("state database {path}: opening it again after a failed write: {reason}")]
    Reopen {
        /// The database directory.
        path: PathBuf,
        /// Why it did not open.
        reason: String,
    },
    /// The content on disk is not a state this agent wrote.
    #[error("state in {path} is unusable: {reason}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// The newest state written, complete.
    State(AgentState),
    /// Nothing was stored yet.
    Empty,
    /// The store was unusable and has been cleared; the reason is given.
    Discarded(String),
    /// An older state than the newest written, complete and checked: the
    /// previous generation (the newest was damaged), or what sled
    /// recovered after losing the newest. The reason says which.
    Older {
        /// The state.
        state: AgentState,
        /// What happened to the newer one.
        reason: String,
    },
}

/// The persisted last good state.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The open database; `None` once a write failed, until the next use
    /// opens it again.
    handle: std::sync::Mutex<Option<Handle>>,
    /// A write failed since the last one that succeeded (or an older
    /// generation was loaded): the next save writes the whole state, not
    /// just its change.
    rewrite: std::sync::atomic::AtomicBool,
    /// The newest generation written (from `meta`, or the generation file
    /// when that is newer), and its checksum.
    last: std::sync::Mutex<Option<(u64, u64)>>,
    failing_saves: std::sync::atomic::AtomicUsize,
    /// A test hook: a first state stops, as a crash would, after this
    /// many batches (never, `usize::MAX`, unless a test sets it).
    cut_after_batches: std::sync::atomic::AtomicUsize,
}

/// Saves that write, or clean up, at least this many entries are
/// followed by [`release_replaced`].
const LARGE_WRITE: usize = 1_000;

/// Frees at once what sled's last writes replaced, and gives the pages
/// back to the kernel when that is much.
///
/// sled frees the tree nodes a write replaces through crossbeam-epoch's
/// collector, which frees at most 8 bags of 64 objects each time a thread
/// has pinned 128 times, and nothing while a transaction holds its pin.
/// So the nodes that one large transaction replaced (a new node's first
/// state at 100,000 Services: 0.55 GiB) waited for the next few dozen
/// updates to be freed, and glibc kept the pages after that: the agent
/// stayed at 1.6 GiB RSS with 0.5 GiB in use (`bench_agent_apply`). Then
/// a `malloc_trim`, after a first state (whose batches freed theirs as
/// they went) or when the drain freed 32 MiB. Both run on a blocking
/// thread, after large writes only, but they hold each malloc arena's
/// lock while they walk it (the trim a quarter of a second at 100,000
/// Services), so an update that allocates meanwhile waits.
fn release_replaced(entries: usize, first: bool) {
    let started = std::time::Instant::now();
    let freed = if first {
        drain(entries);
        None
    } else {
        let before = switchyard_heap::usage();
        drain(entries);
        before
            .zip(switchyard_heap::usage())
            .map(|(b, a)| b.in_use.saturating_sub(a.in_use))
    };
    let released = (first || freed >= Some(TRIM_AFTER)) && switchyard_heap::trim();
    tracing::debug!(entries, ?freed, released, took = ?started.elapsed(), "freed what a large write replaced");
}

/// Runs crossbeam-epoch's collector a pass per 16 entries written: each
/// pass advances the epoch, unless a thread is still pinned in an older
/// one, and frees up to 8 bags of 64 objects, so room for 32 objects per
/// entry. A write of 100,000 entries replaced between 1 and 5 per entry
/// (200 passes freed part of it, 1,000 all of it). Passes past the last
/// bag cost next to nothing; with a thread pinned from before the write,
/// they free nothing, and the collector gets to it later by itself.
fn drain(entries: usize) {
    for _ in 0..entries.div_ceil(16).max(64) {
        crossbeam_epoch::pin().flush();
    }
}

/// sled's page cache. The store is read whole only at a start and written
/// a few resources at a time; sled's default (1 GiB) kept every page of a
/// 100,000-Service state resident: a whole agent held 529 MiB with it, 498
/// with 8 MiB (4 MiB: 495; `bench_agent_apply`, in turn).
const CACHE_CAPACITY: u64 = 8 << 20;

/// Resources per batch of a first state (tests: two, so that their
/// states of a few resources take several).
const FIRST_BATCH: usize = if cfg!(test) { 2 } else { 4_096 };

/// Bytes freed by [`release_replaced`] above which the heap is trimmed.
const TRIM_AFTER: u64 = 32 << 20;

/// A resource's key and its frame, as written.
type Entry = (Vec<u8>, Vec<u8>);

/// One open sled database.
#[derive(Debug, Clone)]
struct Handle {
    db: sled::Db,
    resources: sled::Tree,
    previous: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`. A database sled cannot open is
    /// moved to `dir.corrupt-<unix seconds>` and a fresh one created.
    pub fn open(dir: &Path) -> Result<(Self, Option<String>), StoreError> {
        let path = dir.join("state.sled");
        let store = |handle| Self {
            path: path.clone(),
            handle: std::sync::Mutex::new(Some(handle)),
            rewrite: std::sync::atomic::AtomicBool::new(false),
            last: std::sync::Mutex::new(None),
            failing_saves: std::sync::atomic::AtomicUsize::new(0),
            cut_after_batches: std::sync::atomic::AtomicUsize::new(usize::MAX),
        };
        match open_db(&path) {
            Ok(handle) => Ok((store(handle), None)),
            Err(reason) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = dir.join(format!("state.sled.corrupt-{secs}"));
                tracing::error!(path = %path.display(), %reason, aside = %aside.display(), "state database unusable; moving it aside");
                if let Err(e) = std::fs::rename(&path, &aside) {
                    tracing::warn!(error = %e, "could not move the state aside; removing it");
                    let _ = std::fs::remove_dir_all(&path);
                }
                let handle = open_db(&path).map_err(|reason| StoreError::Corrupt {
                    path: path.clone(),
                    reason,
                })?;
                Ok((store(handle), Some(reason)))
            }
        }
    }

    /// The open database, opened again if a write failed.
    fn handle(&self) -> Result<Handle, StoreError> {
        let mut held = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.as_ref() {
            return Ok(h.clone());
        }
        let h = open_db(&self.path).map_err(|reason| StoreError::Reopen {
            path: self.path.clone(),
            reason,
        })?;
        tracing::info!(path = %self.path.display(), "state database opened again after a failed write");
        *held = Some(h.clone());
        Ok(h)
    }

    /// Closes the database after a failed write (sled keeps the error in
    /// it for good, and holds a lock on its files until its last handle
    /// goes): the next use opens it again.
    fn broke(&self, e: StoreError) -> StoreError {
        tracing::warn!(path = %self.path.display(), "a write failed ({e}); the next save opens the database again and writes the whole state");
        self.rewrite
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(self.handle.lock().unwrap_or_else(|e| e.into_inner()).take());
        e
    }

    /// The generation file beside the database.
    fn generation_file(&self) -> PathBuf {
        self.path.with_file_name(GENERATION_FILE)
    }

    /// The newest generation the generation file says was written: `None`
    /// without one (a first start, or an agent that kept none).
    fn written(&self) -> Result<Option<Meta>, String> {
        let bytes = match std::fs::read(self.generation_file()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let payload = unframe(&bytes)?;
        Meta::decode(payload).map(Some).map_err(|e| e.to_string())
    }

    /// Loads the last good state, checking it against its checksum and the
    /// generation file. Anything damaged is said in the result's reason and
    /// in the log; an unusable store is cleared.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let h = self.handle()?;
        let written = self.written();
        if matches!(written, Ok(None)) && self.cut_short(&h) {
            tracing::info!(path = %self.path.display(), "a first state was cut short before its meta (never ACKed); cleared, a full sync follows");
            self.clear()?;
            return Ok(Loaded::Empty);
        }
        let (newest, previous) = match self.read(&h) {
            Ok(found) => (Ok(found), None),
            Err(damage) => {
                let previous = self.read_previous(&h);
                (Err(damage), Some(previous))
            }
        };
        let outcome = match (newest, previous) {
            (Ok(None), _) => match &written {
                Ok(Some(w)) if w.generation > 0 && w.resource_count > 0 => Err(format!(
                    "the store is empty, but {} was written: lost",
                    w.describe()
                )),
                _ => Ok(Loaded::Empty),
            },
            (Ok(Some((state, meta))), _) => match &written {
                Ok(Some(w)) if w.generation > meta.generation => {
                    self.set_last(w.generation, meta.checksum);
                    self.rewrite
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(Loaded::Older {
                        reason: format!(
                            "rolled back: the store holds {}, but {} was written (lost to damage); \
                             serving the older one until the control plane resyncs",
                            meta.describe(),
                            w.describe()
                        ),
                        state,
                    })
                }
                Err(e) => {
                    self.set_last(meta.generation, meta.checksum);
                    Ok(Loaded::Older {
                        reason: format!(
                            "{GENERATION_FILE} is damaged ({e}): {} loaded, but it cannot be \
                             checked against the newest written",
                            meta.describe()
                        ),
                        state,
                    })
                }
                Ok(_) => {
                    self.set_last(meta.generation, meta.checksum);
                    Ok(Loaded::State(state))
                }
            },
            (Err(damage), Some(Ok((state, meta)))) => {
                let newest = match &written {
                    Ok(Some(w)) => w.generation.max(meta.generation + 1),
                    _ => meta.generation + 1,
                };
                self.set_last(newest, meta.checksum);
                self.rewrite
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(Loaded::Older {
                    reason: format!(
                        "the newest generation is damaged ({damage}); serving the previous one, {}",
                        meta.describe()
                    ),
                    state,
                })
            }
            (Err(damage), Some(Err(previous))) => Err(format!(
                "{damage}; the previous generation is unusable too: {previous}"
            )),
            (Err(damage), None) => Err(damage),
        };
        match outcome {
            Ok(Loaded::Older { state, reason }) => {
                tracing::error!(path = %self.path.display(), %reason, version = %state.version, "persisted state is older than the newest written");
                Ok(Loaded::Older { state, reason })
            }
            Ok(loaded) => Ok(loaded),
            Err(reason) => {
                tracing::error!(path = %self.path.display(), %reason, "discarding persisted state; a full resync follows");
                self.clear()?;
                Ok(Loaded::Discarded(reason))
            }
        }
    }

    /// Whether the store holds resources and nothing else: a first state
    /// whose batches were written but not its `meta` (a crash, a full
    /// disk). With no generation file beside it, nothing was ever ACKed.
    fn cut_short(&self, h: &Handle) -> bool {
        matches!(h.db.get(META_KEY), Ok(None)) && !h.resources.is_empty() && h.previous.is_empty()
    }

    fn set_last(&self, generation: u64, checksum: u64) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, checksum));
    }

    /// The newest state in the store and its meta (`None`: nothing stored),
    /// or why it fails a check.
    fn read(&self, h: &Handle) -> Result<Option<(AgentState, Meta)>, String> {
        let Some(meta) = h.db.get(META_KEY).map_err(|e| e.to_string())? else {
            if h.resources.is_empty() {
                return Ok(None);
            }
            return Err("resources present without metadata".into());
        };
        let meta = decode_meta(&meta)?;
        let mut frames = Vec::new();
        for entry in h.resources.iter() {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            frames.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        check(meta, frames).map(Some)
    }

    /// The previous generation: the newest with what the last update
    /// replaced put back.
    fn read_previous(&self, h: &Handle) -> Result<(AgentState, Meta), String> {
        // The newest update kept (older ones may linger, unread, until the
        // next save removes them).
        let (last, _) = h
            .previous
            .last()
            .map_err(|e| e.to_string())?
            .ok_or("none kept")?;
        let generation = last.get(..8).ok_or("none kept")?;
        let meta = h
            .previous
            .get(generation)
            .map_err(|e| e.to_string())?
            .filter(|m| !m.is_empty())
            .ok_or("none kept")?;
        let meta = decode_meta(&meta)?;
        let mut frames: std::collections::BTreeMap<String, Vec<u8>> =
            std::collections::BTreeMap::new();
        for entry in h.resources.iter() {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            frames.insert(String::from_utf8_lossy(&key).into_owned(), value.to_vec());
        }
        for entry in h.previous.scan_prefix(generation) {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            if key.len() == 8 {
                continue;
            }
            let name = String::from_utf8_lossy(&key[8..]).into_owned();
            if value.is_empty() {
                frames.remove(&name);
            } else {
                frames.insert(name, value.to_vec());
            }
        }
        check(meta, frames.into_iter().collect())
    }

    /// The newest generation written and its checksum, from the last load
    /// or save, else from the store.
    fn last(&self, h: &Handle) -> (u64, u64) {
        if let Some(last) = *self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            return last;
        }
        let meta =
            h.db.get(META_KEY)
                .ok()
                .flatten()
                .and_then(|m| decode_meta(&m).ok());
        let written = self.written().ok().flatten().map_or(0, |w| w.generation);
        meta.map_or((written, 0), |m| (m.generation.max(written), m.checksum))
    }

    /// Writes the change from `previous` (the state stored now) to `state`
    /// and flushes it to disk: the changed and removed resources, what they
    /// replaced, and `meta`, in one transaction; then the generation file.
    /// After a failed write (or a start that served an older generation),
    /// the database is opened again and the whole of `state` written
    /// instead. Over a store with no `meta` (a first state), the whole of
    /// `state` goes in batches and `meta` last.
    pub async fn save(
        &self,
        previous: &AgentState,
        state: &AgentState,
        update: &v1::SnapshotUpdate,
        changes: &ChangeSet,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        use sled::transaction::ConflictableTransactionError;
        let db_err = |source| StoreError::Db {
            path: self.path.clone(),
            source,
        };
        if self
            .failing_saves
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(StoreError::Injected {
                path: self.path.clone(),
            });
        }
        let whole = self.rewrite.load(std::sync::atomic::Ordering::SeqCst);
        let h = self.handle()?;
        let (generation, sum) = self.last(&h);
        let generation = generation + 1;
        let touched: std::collections::BTreeSet<&String> =
            changes.changed.iter().chain(&changes.removed).collect();
        // Nothing stored to keep: a new node's first state, a store cleared
        // or cut short. `state` is written whole, in batches (below).
        let old_meta = h.db.get(META_KEY).map_err(db_err)?;
        let first = old_meta.is_none();
        // Frames are built once: sled may run the closure more than once.
        let (mut written, mut removed, undo, sum): (Vec<Entry>, Vec<Vec<u8>>, Vec<Entry>, u64) =
            if whole || first {
                let written = state
                    .resources
                    .iter()
                    .map(|(name, held)| {
                        let r = v1::Resource {
                            name: name.clone(),
                            version: held.version.clone(),
                            service_state: switchyard_proto::convert::encode_state_bytes(
                                &held.state,
                            ),
                        };
                        (name.as_bytes().to_vec(), frame(&r.encode_to_vec()))
                    })
                    .collect();
                let removed = h
                    .resources
                    .iter()
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| !state.resources.contains_key(&*String::from_utf8_lossy(k)))
                    .map(|k| k.to_vec())
                    .collect();
                // What the store held is in doubt, or nothing: no previous
                // generation (nothing would be read back from an empty one).
                (written, removed, Vec::new(), checksum(state))
            } else {
                let written = update
                    .resources
                    .iter()
                    .map(|r| (r.name.as_bytes().to_vec(), frame(&r.encode_to_vec())))
                    .collect();
                let removed = changes
                    .removed
                    .iter()
                    .map(|n| n.as_bytes().to_vec())
                    .collect();
                let prefix = generation.to_be_bytes();
                let mut undo = Vec::with_capacity(touched.len() + 1);
                for name in &touched {
                    let old = h.resources.get(name.as_bytes()).map_err(db_err)?;
                    undo.push((
                        [&prefix[..], name.as_bytes()].concat(),
                        old.map(|v| v.to_vec()).unwrap_or_default(),
                    ));
                }
                undo.push((
                    prefix.to_vec(),
                    old_meta.map(|v| v.to_vec()).unwrap_or_default(),
                ));
                let sum = touched.iter().fold(sum, |sum, name| {
                    let out = previous
                        .resources
                        .get(*name)
                        .map_or(0, |held| digest(name, &held.version));
                    let into = state
                        .resources
                        .get(*name)
                        .map_or(0, |held| digest(name, &held.version));
                    sum.wrapping_sub(out).wrapping_add(into)
                });
                (written, removed, undo, sum)
            };
        let entries = written.len() + removed.len() + undo.len();
        if first {
            // With no meta stored nothing can be mixed up: the resources go
            // in batches, each followed by freeing what it replaced (one
            // transaction of 100,000 holds its pin, and every node it
            // replaces, to its end: 0.55 GiB), and the meta last, in the
            // transaction below. sled recovers a prefix of its log, so a
            // crash before the meta leaves resources without one: a first
            // state cut short, which the next load clears.
            self.write_in_batches(
                &h,
                std::mem::take(&mut removed),
                std::mem::take(&mut written),
            )
            .map_err(|e| self.broke(e))?;
        }
        let meta = Meta {
            snapshot_version: state.version.clone(),
            resource_count: state.resources.len() as u64,
            saved_at_unix_nanos: now_nanos(),
            generation,
            checksum: sum,
        };
        let meta_frame = frame(&meta.encode_to_vec());
        let default_tree: &sled::Tree = &h.db;
        (&h.resources, default_tree, &h.previous)
            .transaction(|(resources, top, before)| {
                for (name, value) in &undo {
                    before.insert(name.as_slice(), value.as_slice())?;
                }
                for (name, value) in &written {
                    resources.insert(name.as_slice(), value.as_slice())?;
                }
                for name in &removed {
                    resources.remove(name.as_slice())?;
                }
                top.insert(META_KEY, meta_frame.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => db_err(e),
                sled::transaction::TransactionError::Abort(()) => {
                    db_err(sled::Error::Unsupported("transaction aborted".into()))
                }
            })
            .map_err(|e| self.broke(e))?;
        h.db.flush_async()
            .await
            .map_err(|e| self.broke(db_err(e)))?;
        self.set_last(generation, sum);
        // What older updates replaced is read no more: removed off the
        // ACK's path (it is as large as those updates were); after a large
        // save, what sled replaced is freed there too.
        let previous = h.previous.clone();
        let older = generation.to_be_bytes();
        tokio::task::spawn_blocking(move || {
            let mut cleaned = 0;
            for key in previous.range(..older).keys().filter_map(Result::ok) {
                let _ = previous.remove(key);
                cleaned += 1;
            }
            if entries.max(cleaned) >= LARGE_WRITE {
                release_replaced(entries + cleaned, first);
            }
        });
        if whole {
            tracing::info!(path = %self.path.display(), version = %state.version, resources = state.resources.len(), "the whole state written again");
            self.rewrite
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        self.write_generation(&meta_frame);
        Ok(())
    }

    /// Removes `removed` and writes `written` in batches of
    /// [`FIRST_BATCH`], freeing what each replaced before the next.
    fn write_in_batches(
        &self,
        h: &Handle,
        removed: Vec<Vec<u8>>,
        written: Vec<Entry>,
    ) -> Result<(), StoreError> {
        let db_err = |source| StoreError::Db {
            path: self.path.clone(),
            source,
        };
        let removes = removed.chunks(FIRST_BATCH).map(|batch| {
            let mut b = sled::Batch::default();
            for name in batch {
                b.remove(name.as_slice());
            }
            (b, batch.len())
        });
        let inserts = written.chunks(FIRST_BATCH).map(|batch| {
            let mut b = sled::Batch::default();
            for (name, value) in batch {
                b.insert(name.as_slice(), value.as_slice());
            }
            (b, batch.len())
        });
        for (done, (batch, len)) in removes.chain(inserts).enumerate() {
            if self
                .cut_after_batches
                .load(std::sync::atomic::Ordering::SeqCst)
                == done
            {
                return Err(StoreError::Injected {
                    path: self.path.clone(),
                });
            }
            h.resources.apply_batch(batch).map_err(db_err)?;
            drain(len);
        }
        Ok(())
    }

    /// Records the generation just flushed beside the database (write and
    /// rename; not synced: after a crash it can only be older than sled's).
    fn write_generation(&self, meta_frame: &[u8]) {
        let file = self.generation_file();
        let tmp = file.with_extension("generation.tmp");
        if let Err(e) = std::fs::write(&tmp, meta_frame).and_then(|()| std::fs::rename(&tmp, &file))
        {
            tracing::warn!(file = %file.display(), "recording the generation written: {e}");
        }
    }

    /// Makes the next `n` saves fail as a full disk would, before writing
    /// anything (a test hook, like the API server stand-in's faults).
    pub fn fail_next_saves(&self, n: usize) {
        self.failing_saves
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Removes everything stored.
    pub fn clear(&self) -> Result<(), StoreError> {
        let db_err = |source| StoreError::Db {
            path: self.path.clone(),
            source,
        };
        let h = self.handle()?;
        h.resources.clear().map_err(db_err)?;
        h.previous.clear().map_err(db_err)?;
        h.db.remove(META_KEY).map_err(db_err)?;
        h.db.flush().map_err(db_err)?;
        let _ = std::fs::remove_file(self.generation_file());
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
}

/// Opens the sled database at `path`.
fn open_db(path: &Path) -> Result<Handle, String> {
    // Another handle (a previous agent in this process, or one still
    // exiting) may hold sled's file lock for a moment: that is not
    // damage, so wait for it, boundedly, before judging the files.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        // sled may panic on some kinds of damaged files; treat that as corrupt too.
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_CAPACITY)
                .open()
        });
        match opened {
            Ok(Ok(db)) => break db,
            Ok(Err(sled::Error::Io(e)))
                if is_lock_contention(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("sled panicked while opening the database".into()),
        }
    };
    let resources = db.open_tree(RESOURCES_TREE).map_err(|e| e.to_string())?;
    let previous = db.open_tree(PREVIOUS_TREE).map_err(|e| e.to_string())?;
    Ok(Handle {
        db,
        resources,
        previous,
    })
}

fn decode_meta(bytes: &[u8]) -> Result<Meta, String> {
    Meta::decode(unframe(bytes).map_err(|e| format!("metadata: {e}"))?)
        .map_err(|e| format!("metadata: {e}"))
}

/// The state `frames` (name, frame) make, checked against `meta`: every
/// frame, the count, the checksum (when `meta` has one) and the content.
fn check(meta: Meta, frames: Vec<(String, Vec<u8>)>) -> Result<(AgentState, Meta), String> {
    let mut update = v1::SnapshotUpdate {
        snapshot_version: meta.snapshot_version.clone(),
        ..Default::default()
    };
    let mut sum = 0u64;
    for (name, value) in frames {
        let payload = unframe(&value).map_err(|e| format!("resource {name}: {e}"))?;
        let resource =
            v1::Resource::decode(payload).map_err(|e| format!("resource {name}: {e}"))?;
        if resource.name != name {
            return Err(format!("resource {name}: stored under the wrong key"));
        }
        sum = sum.wrapping_add(digest(&resource.name, &resource.version));
        update.resources.push(resource);
    }
    if update.resources.len() as u64 != meta.resource_count {
        return Err(format!(
            "{} resources stored, metadata says {} (truncated write?)",
            update.resources.len(),
            meta.resource_count
        ));
    }
    if meta.generation > 0 && sum != meta.checksum {
        return Err(format!(
            "checksum mismatch: the resources stored are not those of {}",
            meta.describe()
        ));
    }
    let state = AgentState {
        version: meta.snapshot_version.clone(),
        ..AgentState::default()
    };
    let (state, _) = state.apply(&update).map_err(|e| e.to_string())?;
    Ok((state, meta))
}

/// sled reports a held file lock as an I/O error.
fn is_lock_contention(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock")
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Wraps a payload in the checked frame.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a frame and returns its payload.
pub fn unframe(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes is shorter than a frame header",
            bytes.len()
        ));
    }
    if &bytes[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this agent reads {FORMAT_VERSION}"
        ));
    }
    let len = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte bound"
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(format!(
            "truncated: {} of {len} payload bytes",
            payload.len()
        ));
    }
    let crc = u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(version: &str, names: &[&str]) -> v1::SnapshotUpdate {
        v1::SnapshotUpdate {
            snapshot_version: version.into(),
            nonce: "1".into(),
            resources: names
                .iter()
                .map(|n| crate::state::test_resource(n, format!("v-{n}")))
                .collect(),
            ..Default::default()
        }
    }

    async fn saved(dir: &Path) -> Store {
        let (store, discarded) = Store::open(dir).expect("open");
        assert!(discarded.is_none());
        let u = update("v1", &["a", "b"]);
        let (state, changes) = AgentState::default().apply(&u).expect("valid");
        store
            .save(&AgentState::default(), &state, &u, &changes)
            .await
            .expect("save");
        store
    }

    #[tokio::test]
    async fn round_trip_and_incremental_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = saved(dir.path()).await;
        let Loaded::State(s) = store.load().expect("load") else {
            panic!("state expected")
        };
        assert_eq!(s.version, "v1");
        assert_eq!(s.resources.len(), 2);
        let mut u = update("v2", &[]);
        u.removed_resources = vec!["default/ns/a".into()];
        let (next, changes) = s.apply(&u).expect("valid");
        store.save(&s, &next, &u, &changes).await.expect("save");
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("reopen");
        let Loaded::State(s) = store.load().expect("load") else {
            panic!("state expected")
        };
        assert_eq!(s.version, "v2");
        assert_eq!(s.resources.keys().collect::<Vec<_>>(), ["default/ns/b"]);
    }

    /// What the newest update kept in `previous`: (name, whether it was
    /// absent before), the generation's own entry (the meta before it)
    /// first, with an empty name.
    fn newest_kept(store: &Store) -> Vec<(Vec<u8>, bool)> {
        let h = store.handle().expect("open");
        let Some((last, _)) = h.previous.last().expect("read") else {
            return Vec::new();
        };
        h.previous
            .scan_prefix(&last[..8])
            .map(|e| e.expect("read"))
            .map(|(k, v)| (k[8..].to_vec(), v.is_empty()))
            .collect()
    }

    /// Saves `u` over `from` (the state stored) and checks that the new
    /// state loads back exactly.
    async fn save_checked(store: &Store, from: &AgentState, u: &v1::SnapshotUpdate) -> AgentState {
        let (s, changes) = from.apply(u).expect("valid");
        store.save(from, &s, u, &changes).await.expect("save");
        let Loaded::State(loaded) = store.load().expect("load") else {
            panic!("state expected")
        };
        assert_eq!(versions(&loaded), versions(&s));
        s
    }

    #[tokio::test]
    async fn a_first_state_goes_in_batches_and_keeps_no_previous_generation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        // Five resources: three batches of two in tests, then the meta.
        let five = update("v1", &["a", "b", "c", "d", "e"]);
        let s = save_checked(&store, &AgentState::default(), &five).await;
        let changes = AgentState::default().apply(&five).expect("valid").1;
        // Over an empty store there is no previous generation to keep.
        assert_eq!(newest_kept(&store), []);
        // A damaged first generation has nothing older to fall back to.
        store
            .handle()
            .expect("open")
            .resources
            .insert(b"default/ns/a", b"bad".to_vec())
            .expect("insert");
        match store.load().expect("load") {
            Loaded::Discarded(why) => assert!(why.contains("unusable too: none kept"), "{why}"),
            other => panic!("expected a discard, got {other:?}"),
        }

        // Cut short after two batches (a crash, a full disk): four
        // resources and no meta. The retry writes the whole state, less
        // what is no longer in it.
        let cut_short = async |store: &Store, batches| {
            store
                .cut_after_batches
                .store(batches, std::sync::atomic::Ordering::SeqCst);
            let err = store
                .save(&AgentState::default(), &s, &five, &changes)
                .await
                .expect_err("cut short");
            assert!(matches!(err, StoreError::Injected { .. }), "{err}");
            store
                .cut_after_batches
                .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        };
        cut_short(&store, 2).await;
        let h = store.handle().expect("open");
        assert_eq!(h.resources.len(), 4);
        assert!(h.db.get(META_KEY).expect("read").is_none());
        drop(h);
        save_checked(
            &store,
            &AgentState::default(),
            &update("v2", &["a", "c", "f"]),
        )
        .await;

        // Cut short again, then the agent stops: the next start finds
        // resources and no meta, and starts empty (nothing was ACKed).
        store.clear().expect("clear");
        cut_short(&store, 1).await;
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.handle().expect("open").resources.len(), 2);
        assert!(matches!(store.load().expect("load"), Loaded::Empty));
        assert!(store.handle().expect("open").resources.is_empty());

        // An update over a stored state keeps what it replaced: each
        // resource's (or its absence) and the meta before it.
        let s = save_checked(&store, &AgentState::default(), &five).await;
        let u = update("v2", &["a", "x"]);
        let (next, changes) = s.apply(&u).expect("valid");
        store.save(&s, &next, &u, &changes).await.expect("save");
        assert_eq!(
            newest_kept(&store),
            [
                (Vec::new(), false),
                (b"default/ns/a".to_vec(), false),
                (b"default/ns/x".to_vec(), true),
            ]
        );
    }

    #[tokio::test]
    async fn truncated_and_wrong_version_states_are_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = saved(dir.path()).await;
        // A torn write: one resource missing while meta still counts two.
        store
            .handle()
            .expect("open")
            .resources
            .remove(b"default/ns/a")
            .expect("remove");
        match store.load().expect("load") {
            Loaded::Discarded(why) => assert!(why.contains("truncated"), "{why}"),
            other => panic!("expected a discard, got {other:?}"),
        }
        assert!(
            matches!(store.load().expect("load"), Loaded::Empty),
            "cleared"
        );

        let store2_dir = tempfile::tempdir().expect("tempdir");
        let store = saved(store2_dir.path()).await;
        let h = store.handle().expect("open");
        let mut meta = h.db.get(META_KEY).expect("get").expect("meta").to_vec();
        meta[4..6].copy_from_slice(&7u16.to_be_bytes());
        h.db.insert(META_KEY, meta).expect("insert");
        match store.load().expect("load") {
            Loaded::Discarded(why) => assert!(why.contains("format version 7"), "{why}"),
            other => panic!("expected a discard, got {other:?}"),
        }
    }

    /// Twelve generations of a 30-resource state: each update changes
    /// three resources and replaces one. Returns the states, oldest first.
    async fn history(dir: &Path) -> Vec<AgentState> {
        let (store, _) = Store::open(dir).expect("open");
        let mut states = Vec::new();
        let mut current = AgentState::default();
        for g in 1..=12u32 {
            let names: Vec<String> = if g == 1 {
                (0..30).map(|i| format!("r{i}")).collect()
            } else {
                (0..3).map(|k| format!("r{}", (g * 7 + k) % 30)).collect()
            };
            let mut u = v1::SnapshotUpdate {
                snapshot_version: format!("v{g}"),
                nonce: "1".into(),
                resources: names
                    .iter()
                    .map(|n| crate::state::test_resource(n, format!("g{g}-{n}")))
                    .collect(),
                ..Default::default()
            };
            if g > 1 {
                let gone = format!("x{}", g - 1);
                if current
                    .resources
                    .contains_key(&format!("default/ns/{gone}"))
                {
                    u.removed_resources.push(format!("default/ns/{gone}"));
                }
                u.resources.push(crate::state::test_resource(
                    &format!("x{g}"),
                    format!("g{g}"),
                ));
            }
            let (next, changes) = current.apply(&u).expect("valid");
            store
                .save(&current, &next, &u, &changes)
                .await
                .expect("save");
            states.push(next.clone());
            current = next;
        }
        states
    }

    fn versions(s: &AgentState) -> Vec<(String, String)> {
        s.resources
            .iter()
            .map(|(n, h)| (n.clone(), h.version.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_damaged_newest_generation_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let states = history(dir.path()).await;
        let (store, _) = Store::open(dir.path()).expect("open");
        let Loaded::State(s) = store.load().expect("load") else {
            panic!("the newest state")
        };
        assert_eq!(versions(&s), versions(&states[11]));
        // A byte of a resource the last update wrote goes bad.
        let h = store.handle().expect("open");
        let mut bad = h
            .resources
            .get(b"default/ns/x12")
            .expect("get")
            .expect("x12")
            .to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        h.resources.insert(b"default/ns/x12", bad).expect("insert");
        let Loaded::Older { state, reason } = store.load().expect("load") else {
            panic!("the previous generation")
        };
        assert_eq!(versions(&state), versions(&states[10]));
        assert_eq!(state.version, "v11");
        assert!(
            reason.contains("newest generation is damaged")
                && reason.contains("resource default/ns/x12: checksum mismatch")
                && reason.contains("generation 11 (version v11, 31 resources)"),
            "{reason}"
        );
        // The next save writes the whole state over the damage.
        save_checked(&store, &state, &update("v13", &["y"])).await;
    }

    #[tokio::test]
    async fn one_resource_rolled_back_alone_fails_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        history(dir.path()).await;
        let (store, _) = Store::open(dir.path()).expect("open");
        // r0 as generation 1 wrote it: a valid frame, but not this state's.
        let h = store.handle().expect("open");
        let old = frame(&crate::state::test_resource("r0", "g1-r0".into()).encode_to_vec());
        let now = h.resources.get(b"default/ns/r0").expect("get").expect("r0");
        assert_ne!(&*now, old.as_slice(), "r0 changed since");
        h.resources.insert(b"default/ns/r0", old).expect("insert");
        match store.load().expect("load") {
            Loaded::Discarded(why) => assert!(
                why.contains(
                    "checksum mismatch: the resources stored are not those of generation 12"
                ),
                "{why}"
            ),
            other => panic!("expected a discard, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_store_older_than_the_generation_written_is_said_to_be_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let states = history(dir.path()).await;
        // The database as it was at generation 12, under a generation
        // file that says 14 were written.
        let (store, _) = Store::open(dir.path()).expect("open");
        let mut newer = states[11].clone();
        for g in 13..=14 {
            let u = update(&format!("v{g}"), &[&format!("z{g}")]);
            let (next, changes) = newer.apply(&u).expect("valid");
            store.save(&newer, &next, &u, &changes).await.expect("save");
            newer = next;
        }
        let written = std::fs::read(dir.path().join(GENERATION_FILE)).expect("generation file");
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("open");
        let h = store.handle().expect("open");
        for g in 13..=14 {
            h.resources
                .remove(format!("default/ns/z{g}").as_bytes())
                .expect("remove");
        }
        let meta12 = Meta {
            snapshot_version: "v12".into(),
            resource_count: states[11].resources.len() as u64,
            saved_at_unix_nanos: 0,
            generation: 12,
            checksum: checksum(&states[11]),
        };
        h.db.insert(META_KEY, frame(&meta12.encode_to_vec()))
            .expect("insert");
        std::fs::write(dir.path().join(GENERATION_FILE), written).expect("write");
        let Loaded::Older { state, reason } = store.load().expect("load") else {
            panic!("an older state, said")
        };
        assert_eq!(versions(&state), versions(&states[11]));
        assert!(
            reason.contains("rolled back")
                && reason.contains("generation 12 (version v12")
                && reason.contains("generation 14 (version v14"),
            "{reason}"
        );
    }

    /// What a start on a damaged copy of `dir` finds: `Ok` with the loaded
    /// state and whatever it said, or the discard reason.
    fn start_on(dir: &Path) -> (Option<AgentState>, Option<String>) {
        let (store, moved_aside) = match Store::open(dir) {
            Ok(s) => s,
            Err(e) => return (None, Some(e.to_string())),
        };
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.load()));
        match loaded {
            Ok(Ok(Loaded::State(s))) => (Some(s), moved_aside),
            Ok(Ok(Loaded::Older { state, reason })) => (Some(state), Some(reason)),
            Ok(Ok(Loaded::Discarded(why))) => (None, Some(why)),
            Ok(Ok(Loaded::Empty)) => (None, moved_aside),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (None, Some("panicked".into())),
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let e = e.expect("entry");
            let target = to.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).expect("copy");
            }
        }
    }

    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                files(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }

    /// One kind of damage to a file.
    #[derive(Debug, Clone, Copy)]
    enum Damage {
        /// The byte at this offset flipped.
        Flip(usize),
        /// The file cut to this many bytes.
        Cut(usize),
    }

    #[tokio::test]
    async fn flipped_bytes_and_truncated_sled_files_are_always_said() {
        let pristine = tempfile::tempdir().expect("tempdir");
        let states = history(pristine.path()).await;
        let newest = versions(&states[11]);
        let mut sled_files = Vec::new();
        files(&pristine.path().join("state.sled"), &mut sled_files);
        let mut cases = 0;
        let mut said = 0;
        for file in &sled_files {
            let rel = file.strip_prefix(pristine.path()).expect("inside");
            let len = std::fs::metadata(file).expect("metadata").len();
            if len == 0 {
                continue;
            }
            let mut damages: Vec<Damage> = (0..24u64)
                .map(|k| Damage::Flip((len * k / 24) as usize))
                .collect();
            damages.extend((0..4u64).map(|k| Damage::Cut((len * k / 4) as usize)));
            damages.push(Damage::Cut(len as usize - 1));
            for damage in damages {
                let scratch = tempfile::tempdir().expect("tempdir");
                copy_dir(pristine.path(), scratch.path());
                let target = scratch.path().join(rel);
                let mut bytes = std::fs::read(&target).expect("read");
                match damage {
                    Damage::Flip(at) => bytes[at] ^= 0x5a,
                    Damage::Cut(keep) => bytes.truncate(keep),
                }
                std::fs::write(&target, bytes).expect("write");
                cases += 1;
                let (state, note) = start_on(scratch.path());
                let case = format!("{} {damage:?}", rel.display());
                match (state, note) {
                    // Harmless damage: the newest state, complete.
                    (Some(s), None) => {
                        assert_eq!(versions(&s), newest, "{case}: an older state, unsaid")
                    }
                    (Some(_), Some(_)) | (None, Some(_)) => said += 1,
                    (None, None) => panic!("{case}: started empty, unsaid"),
                }
            }
        }
        assert!(cases > 50, "{cases} cases");
        eprintln!("{cases} kinds of damage, {said} said, the rest harmless");
    }

    #[test]
    fn frame_checks() {
        let f = frame(b"hello");
        assert_eq!(unframe(&f), Ok(&b"hello"[..]));
        assert!(
            unframe(&f[..f.len() - 1])
                .expect_err("truncated")
                .contains("truncated")
        );
        let mut bad = f.clone();
        bad[HEADER_LEN] ^= 1;
        assert_eq!(unframe(&bad), Err("checksum mismatch".into()));
        let mut old = f.clone();
        old[5] = 9;
        assert!(
            unframe(&old)
                .expect_err("version")
                .contains("format version 9")
        );
        let mut magic = f;
        magic[0] = b'X';
        assert_eq!(unframe(&magic), Err("bad magic".into()));
        assert!(unframe(b"SWY").is_err());
    }
}
