//! The stand-in's "etcd": objects by kind, one global resourceVersion, and
//! an event log with a compaction point.
//!
//! ```text
//!  create/update/delete ─▶ rv += 1 ─▶ objects ─▶ log (rv, type, old, new) ─▶ broadcast to watches
//!                                                  │
//!                                   compact(): drop log ≤ rv; watches from older rvs get 410
//! ```
//!
//! Every write happens under one lock and is broadcast while the lock is
//! held, so a watch that subscribes under the same lock sees every event
//! after the state it started from, exactly once.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1 Service`, namespaced.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`, namespaced.
    EndpointSlice,
    /// `v1 Node`, cluster-scoped.
    Node,
    /// `multicluster.x-k8s.io/v1alpha1 ServiceExport` (the MCS API's CRD), namespaced.
    ServiceExport,
    /// `v1 ConfigMap`, namespaced (the kube-dns ConfigMap).
    ConfigMap,
    /// `multicluster.x-k8s.io ServiceImport` (the MCS API's CRD), namespaced.
    ServiceImport,
}

/// The MCS API's versions, the storage (preferred) one first: its CRDs are
/// served in both, with no conversion (the objects are the same).
pub const MCS_VERSIONS: [&str; 2] = [
    "multicluster.x-k8s.io/v1beta1",
    "multicluster.x-k8s.io/v1alpha1",
];

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ServiceExport,
        Kind::ConfigMap,
        Kind::ServiceImport,
    ];

    /// Whether it is one of the MCS API's kinds.
    pub fn mcs(self) -> bool {
        matches!(self, Kind::ServiceExport | Kind::ServiceImport)
    }

    /// The group/versions it is served in, the storage one first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::Service | Kind::Node | Kind::ConfigMap => &["v1"],
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            Kind::ServiceExport | Kind::ServiceImport => &MCS_VERSIONS,
        }
    }

    /// Whether `status` is written through a `/status` subresource only
    /// (the MCS CRDs declare `subresources: {status: {}}`).
    pub fn has_status(self) -> bool {
        self.mcs()
    }

    /// `kind` of one object.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceExport => "ServiceExport",
            Kind::ConfigMap => "ConfigMap",
            Kind::ServiceImport => "ServiceImport",
        }
    }

    /// `apiVersion` of the kind as stored (its preferred version).
    pub fn api_version(self) -> &'static str {
        self.versions()[0]
    }

    /// The plural resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ServiceExport => "serviceexports",
            Kind::ConfigMap => "configmaps",
            Kind::ServiceImport => "serviceimports",
        }
    }

    /// The kind named by a URL's plural resource name and its group/version.
    pub fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.versions().contains(&group_version) && k.plural() == plural)
    }

    /// Whether objects live in namespaces.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// Checks that `obj` has the shape of the kind's API type.
    pub fn check_shape(self, obj: &Value) -> Result<(), String> {
        use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
        let r = match self {
            Kind::Service => serde_json::from_value::<core::Service>(obj.clone()).map(drop),
            Kind::EndpointSlice => {
                serde_json::from_value::<discovery::EndpointSlice>(obj.clone()).map(drop)
            }
            Kind::Node => serde_json::from_value::<core::Node>(obj.clone()).map(drop),
            Kind::ConfigMap => serde_json::from_value::<core::ConfigMap>(obj.clone()).map(drop),
            // A CRD with a permissive schema (its spec is optional): only
            // the object metadata must have the right shape.
            Kind::ServiceExport | Kind::ServiceImport => serde_json::from_value::<
                k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            >(
                obj.get("metadata").cloned().unwrap_or_default(),
            )
            .map(drop),
        };
        r.map_err(|e| e.to_string())
    }
}

/// Identifies one object: kind, namespace ("" for cluster-scoped), name.
pub type ObjectKey = (Kind, String, String);

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as logged and broadcast.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion this change created.
    pub rv: u64,
    /// What happened.
    pub event: EventType,
    /// The object's kind.
    pub kind: Kind,
    /// The object before (none for ADDED).
    pub old: Option<Arc<Value>>,
    /// The object after (for DELETED: the object as deleted, with the new rv).
    pub new: Arc<Value>,
}

/// Why a write failed, as the API would say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `reason` of the Status object (`NotFound`, `Conflict`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `v1 Status` object for this error.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message,
            "reason": self.reason, "code": self.code,
        })
    }
}

#[derive(Debug)]
struct Inner {
    rv: u64,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    log: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    next_uid: u64,
}

/// The shared object store. Cheap to clone; clones share everything, so a
/// restarted server can serve the same store ("etcd survived").
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Arc<Change>>,
    log_capacity: usize,
}

/// One page of a list.
#[derive(Debug)]
pub struct Page {
    /// The objects, in key order.
    pub items: Vec<Arc<Value>>,
    /// Whether more objects follow the page.
    pub more: bool,
    /// The store's rv when listing.
    pub rv: u64,
}

/// What a watch starts from: the state at `rv` and every later change.
#[derive(Debug)]
pub struct Subscription {
    /// Current objects of the kind (when asked for).
    pub objects: Vec<Arc<Value>>,
    /// Logged changes after the requested rv (when asked for).
    pub replay: Vec<Change>,
    /// The store's rv when subscribing.
    pub rv: u64,
    /// Changes after `rv`.
    pub events: broadcast::Receiver<Arc<Change>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl Store {
    /// A store keeping at most `log_capacity` events (older ones compact).
    pub fn new(log_capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                compacted: 1,
                next_uid: 1,
            })),
            events: broadcast::Sender::new(65_536),
            log_capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// The compaction point: watches from an older resourceVersion get 410.
    pub fn compacted(&self) -> u64 {
        self.lock().compacted
    }

    /// Forgets every logged event: watches resuming from before now get 410.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.rv;
        s.log.clear();
    }

    /// One object.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Value>> {
        self.lock().objects.get(key).cloned()
    }

    /// The objects of `kind` (in `namespace` if given) with keys after
    /// `after`, in key order, plus the current rv.
    pub fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
    ) -> (Vec<Arc<Value>>, u64) {
        let page = self.list_page(kind, namespace, after, usize::MAX, |_| true);
        (page.items, page.rv)
    }

    /// Up to `limit` objects of `kind` (in `namespace` if given) that `keep`
    /// accepts, with keys after `after`, in key order. The walk stops at the
    /// first accepted object past the page, as the API server's does: a page
    /// costs its own size (and what `keep` skips), not what follows it.
    pub fn list_page(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> Page {
        let s = self.lock();
        let start = match after {
            Some((ns, name)) => Bound::Excluded((kind, ns.to_owned(), name.to_owned())),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let mut items = Vec::new();
        let mut more = false;
        let candidates = s
            .objects
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.0 == kind)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.1 == ns))
            .filter(|(_, v)| keep(v));
        for (_, v) in candidates {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(v.clone());
        }
        Page {
            items,
            more,
            rv: s.rv,
        }
    }

    /// Waits until `check` holds of the store, looking again after each
    /// change (bounded by the caller: wrap it in `within`).
    pub async fn until(&self, mut check: impl FnMut(&Store) -> bool) {
        let mut events = self.events.subscribe();
        while !check(self) {
            match events.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Subscribes to changes; with `with_objects`, also returns the current
    /// objects of `kind`; with `replay_after`, the logged changes after that
    /// rv (410 if it is older than the compaction point).
    pub fn subscribe(
        &self,
        kind: Kind,
        with_objects: bool,
        replay_after: Option<u64>,
    ) -> Result<Subscription, ApiError> {
        let s = self.lock();
        let mut replay = Vec::new();
        if let Some(from) = replay_after {
            if from < s.compacted {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", s.compacted),
                ));
            }
            replay = s
                .log
                .iter()
                .filter(|c| c.rv > from && c.kind == kind)
                .cloned()
                .collect();
        }
        let objects = if with_objects {
            s.objects
                .range((kind, String::new(), String::new())..)
                .take_while(|(k, _)| k.0 == kind)
                .map(|(_, v)| v.clone())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Subscription {
            objects,
            replay,
            rv: s.rv,
            events: self.events.subscribe(),
        })
    }

    /// Creates an object; fills in uid, resourceVersion, creationTimestamp,
    /// generation, kind and apiVersion.
    pub fn create(&self, kind: Kind, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        let key = key_of(kind, &obj)?;
        kind.check_shape(&obj)
            .map_err(|e| ApiError::new(400, "BadRequest", e))?;
        let mut s = self.lock();
        if s.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", kind.plural(), key.2),
            ));
        }
        s.rv += 1;
        s.next_uid += 1;
        let rv = s.rv;
        let uid = format!("00000000-0000-4000-8000-{:012x}", s.next_uid);
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if kind.namespaced() {
            meta["namespace"] = json!(key.1);
        }
        let obj = Arc::new(obj);
        s.objects.insert(key, obj.clone());
        self.record(&mut s, EventType::Added, kind, None, obj.clone());
        Ok(obj)
    }

    /// Replaces an object. A resourceVersion in `obj` must match the stored
    /// one (409 otherwise); uid and creationTimestamp are kept; generation
    /// moves when anything but metadata and status changed; an update that
    /// changes nothing keeps the resourceVersion and makes no event.
    pub fn update(&self, kind: Kind, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        let key = key_of(kind, &obj)?;
        kind.check_shape(&obj)
            .map_err(|e| ApiError::new(400, "BadRequest", e))?;
        let mut s = self.lock();
        let Some(old) = s.objects.get(&key).cloned() else {
            return Err(not_found(&key));
        };
        let wanted = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let current = old["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !wanted.is_empty() && wanted != current {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again",
                    kind.plural(),
                    key.2
                ),
            ));
        }
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
            obj["metadata"][field] = old["metadata"][field].clone();
        }
        if kind.namespaced() {
            obj["metadata"]["namespace"] = json!(key.1);
        }
        if obj == *old {
            // No-op updates keep the resourceVersion and make no event.
            return Ok(old);
        }
        if without_meta(&obj) != without_meta(&old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(generation + 1);
        }
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let obj = Arc::new(obj);
        s.objects.insert(key, obj.clone());
        self.record(&mut s, EventType::Modified, kind, Some(old), obj.clone());
        Ok(obj)
    }

    /// Deletes an object; returns it as deleted.
    pub fn delete(&self, key: &ObjectKey) -> Result<Arc<Value>, ApiError> {
        let mut s = self.lock();
        let Some(old) = s.objects.remove(key) else {
            return Err(not_found(key));
        };
        s.rv += 1;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let gone = Arc::new(gone);
        self.record(&mut s, EventType::Deleted, key.0, Some(old), gone.clone());
        Ok(gone)
    }

    fn record(
        &self,
        s: &mut Inner,
        event: EventType,
        kind: Kind,
        old: Option<Arc<Value>>,
        new: Arc<Value>,
    ) {
        let change = Change {
            rv: s.rv,
            event,
            kind,
            old,
            new,
        };
        s.log.push_back(change.clone());
        while s.log.len() > self.log_capacity {
            if let Some(dropped) = s.log.pop_front() {
                s.compacted = dropped.rv;
            }
        }
        // No watch listening is fine.
        let _ = self.events.send(Arc::new(change));
    }
}

fn without_meta(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn not_found(key: &ObjectKey) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} {:?} not found", key.0.plural(), key.2),
    )
}

/// The key of `obj` (which must name itself); namespace defaults to `default`.
pub fn key_of(kind: Kind, obj: &Value) -> Result<ObjectKey, ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name: Required value"))?;
    let namespace = if kind.namespaced() {
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    } else {
        ""
    };
    Ok((kind, namespace.to_owned(), name.to_owned()))
}

/// Now as RFC 3339 (UTC, seconds).
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, port: u16) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}, "spec": {"ports": [{"port": port}]}})
    }

    #[test]
    fn writes_move_one_resource_version_and_log_changes() {
        let store = Store::default();
        let a = store
            .create(Kind::Service, svc("ns", "a", 80))
            .expect("create");
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(a["kind"], "Service");
        assert_eq!(
            store
                .create(Kind::Service, svc("ns", "a", 80))
                .expect_err("dup")
                .code,
            409
        );
        let mut stale = svc("ns", "a", 81);
        stale["metadata"]["resourceVersion"] = json!("1");
        assert_eq!(
            store.update(Kind::Service, stale).expect_err("stale").code,
            409
        );
        let b = store
            .update(Kind::Service, svc("ns", "a", 81))
            .expect("update");
        assert_eq!(b["metadata"]["resourceVersion"], "3");
        assert_eq!(b["metadata"]["generation"], 2);
        assert_eq!(b["metadata"]["uid"], a["metadata"]["uid"]);
        // A no-op update makes no event.
        store
            .update(Kind::Service, svc("ns", "a", 81))
            .expect("no-op");
        assert_eq!(store.resource_version(), 3);
        store
            .delete(&(Kind::Service, "ns".into(), "a".into()))
            .expect("delete");
        let sub = store
            .subscribe(Kind::Service, false, Some(2))
            .expect("replay");
        let events: Vec<_> = sub.replay.iter().map(|c| (c.rv, c.event)).collect();
        assert_eq!(events, [(3, EventType::Modified), (4, EventType::Deleted)]);
        store.compact();
        assert_eq!(
            store
                .subscribe(Kind::Service, false, Some(2))
                .expect_err("gone")
                .code,
            410
        );
        assert!(store.subscribe(Kind::Service, false, Some(4)).is_ok());
    }

    #[test]
    fn lists_page_in_key_order_by_kind() {
        let store = Store::default();
        for (ns, n) in [("b", "x"), ("a", "y"), ("a", "x")] {
            store.create(Kind::Service, svc(ns, n, 80)).expect("create");
        }
        store
            .create(Kind::Node, json!({"metadata": {"name": "n1"}}))
            .expect("node");
        let (all, rv) = store.list(Kind::Service, None, None);
        assert_eq!(rv, 5);
        let names: Vec<_> = all
            .iter()
            .map(|o| format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]))
            .collect();
        assert_eq!(names, [r#""a"/"x""#, r#""a"/"y""#, r#""b"/"x""#]);
        let (rest, _) = store.list(Kind::Service, None, Some(("a", "y")));
        assert_eq!(rest.len(), 1);
        let (in_a, _) = store.list(Kind::Service, Some("a"), None);
        assert_eq!(in_a.len(), 2);
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
