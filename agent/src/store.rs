//! The last good state on disk, in sled.
//!
//! Layout of the database under `--state-dir`:
//!
//! ```text
//!   tree "resources":  name -> frame(v1::Resource)      one entry per resource
//!   key  "meta":       frame(Meta)                      snapshot version and count
//! ```
//!
//! Every value is a frame: `b"SWYS"`, format version (u16 BE), payload
//! length (u32 BE), CRC-32 of the payload (u32 BE), payload (protobuf). An
//! update (its changed and removed resources and the new `meta`) is written
//! in one sled transaction over both trees and flushed before the agent
//! ACKs: a crash at any point leaves exactly the old or exactly the new
//! state, never new resources labelled with the old version
//! (`integration-tests/tests/crash.rs` kills a real agent around its saves
//! to check it).
//!
//! Loading checks the magic, the format version, the length, the checksum,
//! the resource count and each resource's validity. Anything wrong discards
//! the whole store (the caller resyncs from the control plane); a database
//! sled itself cannot open is moved aside, never a crash loop.
//!
//! Once a write fails (a full disk: ENOSPC), sled keeps that error and
//! fails every later operation, even after space comes back. So a failed
//! write marks the store broken, and the next save closes the database,
//! opens it again and writes the whole state, not just the change: the
//! agent recovers on its first retry once the disk has room.

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

/// The metadata frame's payload.
#[derive(Clone, PartialEq, prost::Message)]
struct Meta {
    #[prost(string, tag = "1")]
    snapshot_version: String,
    #[prost(uint64, tag = "2")]
    resource_count: u64,
    #[prost(int64, tag = "3")]
    saved_at_unix_nanos: i64,
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
    /// A complete state.
    State(AgentState),
    /// Nothing was stored yet.
    Empty,
    /// The store was unusable and has been cleared; the reason is given.
    Discarded(String),
}

/// The persisted last good state.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The open database; `None` once a write failed, until the next use
    /// opens it again.
    handle: std::sync::Mutex<Option<Handle>>,
    /// A write failed since the last one that succeeded: the next save
    /// writes the whole state, not just its change.
    rewrite: std::sync::atomic::AtomicBool,
    failing_saves: std::sync::atomic::AtomicUsize,
}

/// A resource's key and its frame, as written.
type Entry = (Vec<u8>, Vec<u8>);

/// One open sled database.
#[derive(Debug, Clone)]
struct Handle {
    db: sled::Db,
    resources: sled::Tree,
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
            failing_saves: std::sync::atomic::AtomicUsize::new(0),
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

    /// Loads the last good state, discarding (and clearing) anything that
    /// fails a check.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        match self.try_load() {
            Ok(Some(state)) => Ok(Loaded::State(state)),
            Ok(None) => Ok(Loaded::Empty),
            Err(reason) => {
                tracing::error!(path = %self.path.display(), %reason, "discarding persisted state; a full resync follows");
                self.clear()?;
                Ok(Loaded::Discarded(reason))
            }
        }
    }

    fn try_load(&self) -> Result<Option<AgentState>, String> {
        let h = self.handle().map_err(|e| e.to_string())?;
        let Some(meta) = h.db.get(META_KEY).map_err(|e| e.to_string())? else {
            if h.resources.is_empty() {
                return Ok(None);
            }
            return Err("resources present without metadata".into());
        };
        let meta = Meta::decode(unframe(&meta).map_err(|e| format!("metadata: {e}"))?)
            .map_err(|e| format!("metadata: {e}"))?;
        let mut state = AgentState {
            version: meta.snapshot_version.clone(),
            ..AgentState::default()
        };
        let mut update = v1::SnapshotUpdate {
            snapshot_version: meta.snapshot_version,
            ..Default::default()
        };
        for entry in h.resources.iter() {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let payload = unframe(&value).map_err(|e| format!("resource {name}: {e}"))?;
            let resource =
                v1::Resource::decode(payload).map_err(|e| format!("resource {name}: {e}"))?;
            if resource.name != name {
                return Err(format!("resource {name}: stored under the wrong key"));
            }
            update.resources.push(resource);
        }
        if update.resources.len() as u64 != meta.resource_count {
            return Err(format!(
                "{} resources stored, metadata says {} (truncated write?)",
                update.resources.len(),
                meta.resource_count
            ));
        }
        let (loaded, _) = state.apply(&update).map_err(|e| e.to_string())?;
        state = loaded;
        Ok(Some(state))
    }

    /// Writes the change that led to `state` and flushes it to disk: the
    /// changed and removed resources and `meta` in one transaction. After
    /// a failed write, the database is opened again and the whole of
    /// `state` written instead.
    pub async fn save(
        &self,
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
        // Frames are built once: sled may run the closure more than once.
        let (written, removed): (Vec<Entry>, Vec<Vec<u8>>) = if whole {
            let written = state
                .resources
                .iter()
                .map(|(name, held)| {
                    let r = v1::Resource {
                        name: name.clone(),
                        version: held.version.clone(),
                        service_state: switchyard_proto::convert::encode_state_bytes(&held.state),
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
            (written, removed)
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
            (written, removed)
        };
        let meta = frame(
            &Meta {
                snapshot_version: state.version.clone(),
                resource_count: state.resources.len() as u64,
                saved_at_unix_nanos: now_nanos(),
            }
            .encode_to_vec(),
        );
        let default_tree: &sled::Tree = &h.db;
        (&h.resources, default_tree)
            .transaction(|(resources, top)| {
                for (name, value) in &written {
                    resources.insert(name.as_slice(), value.as_slice())?;
                }
                for name in &removed {
                    resources.remove(name.as_slice())?;
                }
                top.insert(META_KEY, meta.as_slice())?;
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
        if whole {
            tracing::info!(path = %self.path.display(), version = %state.version, resources = state.resources.len(), "the whole state written again after a failed write");
            self.rewrite
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
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
        h.db.remove(META_KEY).map_err(db_err)?;
        h.db.flush().map_err(db_err)?;
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
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(path).open());
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
    Ok(Handle { db, resources })
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
        store.save(&state, &u, &changes).await.expect("save");
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
        store.save(&next, &u, &changes).await.expect("save");
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("reopen");
        let Loaded::State(s) = store.load().expect("load") else {
            panic!("state expected")
        };
        assert_eq!(s.version, "v2");
        assert_eq!(s.resources.keys().collect::<Vec<_>>(), ["default/ns/b"]);
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
