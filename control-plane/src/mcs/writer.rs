//! Writes the clusterset into one cluster's API server: the ServiceImports
//! and the ServiceExport conditions that [`super::Clusterset`] says it
//! should hold.
//!
//! ```text
//!  Clusterset (watch) ─┐
//!  the source's state ─┼─▶ a pass: what differs from what was last applied ─▶ server-side apply
//!  (ServiceImports     │        ServiceImport spec + labels, its status.clusters,     (field manager
//!   found there)       │        ServiceExport status.conditions; ours no longer        "switchyard",
//!                      │        wanted are deleted (only once every source synced)     never forced)
//!                      └─ failures: the pass runs again after a backoff (0.5 s doubling to 60 s)
//! ```
//!
//! Reading never waits for writing: the writer is a task of its own fed by
//! watch channels, and a slow or failing API server only delays its pass.
//! It never takes over what another manager owns: applies are not forced
//! (a 409 is reported and retried), a ServiceImport without our
//! `app.kubernetes.io/managed-by` label is left alone and reported (a GET
//! checks before our first write of each), and only
//! ours are deleted. A condition keeps its `lastTransitionTime` while its
//! status stays (learned from the API server when the writer starts).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use switchyard_model::ServiceKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Clusterset, ExportConditions, FIELD_MANAGER, Import};
use crate::source::kubernetes::{mcs_resource, served_mcs_version};
use crate::source::{ObjectError, SourceState};
use crate::status::{Status, WriteBackStatus};

/// What a writer is given: the clusterset to write, and where to report.
#[derive(Debug, Clone)]
pub struct WriteBack {
    /// What every cluster should hold, after each build.
    pub clusterset: watch::Receiver<Option<Arc<Clusterset>>>,
    /// Where `/status` learns how writing goes.
    pub status: Arc<Status>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How many writes are in flight at once.
const CONCURRENCY: usize = 8;

/// Writes the clusterset into the API server of `cluster` (reached by
/// `client`) until `shutdown`. `source` is the kube source's own state: the
/// ServiceImports it found there.
pub async fn run(
    cluster: String,
    client: Client,
    mut write_back: WriteBack,
    mut source: watch::Receiver<SourceState>,
    shutdown: CancellationToken,
) {
    let mut writer = Writer::new(cluster, client);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let wanted = write_back.clusterset.borrow_and_update().clone();
        let found = source.borrow_and_update().service_imports.clone();
        let retry = match wanted {
            Some(wanted) => {
                let ok = writer.pass(&wanted, &found).await;
                write_back
                    .status
                    .set_write_back(&writer.cluster, writer.report.clone());
                !ok
            }
            None => false,
        };
        if retry {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = write_back.clusterset.changed() => if r.is_err() { return },
            r = source.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(backoff), if retry => {}
        }
    }
}

/// One object to write.
#[derive(Debug)]
enum Write {
    /// A ServiceImport's spec and metadata; `check`: not written before by
    /// this writer, so first make sure no other implementation manages it
    /// (the source's view of the cluster may not hold it yet).
    Import {
        key: (String, String),
        body: Value,
        check: bool,
    },
    /// A ServiceImport's `status.clusters`.
    ImportStatus { key: (String, String), body: Value },
    /// A ServiceExport's conditions.
    Export { key: ServiceKey, body: Value },
    /// One of our ServiceImports that no cluster exports any more.
    Delete { key: (String, String) },
}

impl Write {
    fn object(&self) -> String {
        match self {
            Write::Import { key, .. } | Write::ImportStatus { key, .. } | Write::Delete { key } => {
                format!("ServiceImport {}/{}", key.0, key.1)
            }
            Write::Export { key, .. } => format!("ServiceExport {}/{}", key.namespace, key.name),
        }
    }

    fn field(&self) -> &'static str {
        match self {
            Write::Import { .. } => "spec",
            Write::ImportStatus { .. } => "status.clusters",
            Write::Export { .. } => "status.conditions",
            Write::Delete { .. } => "",
        }
    }

    /// The key under which a successful write is remembered.
    fn memo(&self) -> String {
        match self {
            Write::Import { key, .. } => format!("import/{}/{}", key.0, key.1),
            Write::ImportStatus { key, .. } => format!("import-status/{}/{}", key.0, key.1),
            Write::Export { key, .. } => format!("export/{}/{}", key.namespace, key.name),
            Write::Delete { key } => format!("delete/{}/{}", key.0, key.1),
        }
    }
}

/// A condition as last seen or written: its status and transition time.
type Transition = (String, String);

struct Writer {
    cluster: String,
    client: Client,
    /// The MCS version served, found by discovery (again after a 404).
    version: Option<&'static str>,
    /// What was last applied successfully, by [`Write::memo`].
    applied: HashMap<String, Value>,
    /// ServiceExport (namespace, name) -> condition type -> its transition.
    transitions: HashMap<(String, String), BTreeMap<String, Transition>>,
    report: WriteBackStatus,
}

impl Writer {
    fn new(cluster: String, client: Client) -> Self {
        Self {
            cluster,
            client,
            version: None,
            applied: HashMap::new(),
            transitions: HashMap::new(),
            report: WriteBackStatus::default(),
        }
    }

    /// Makes the API server hold `wanted`, given the ServiceImports it has
    /// (`found`). Whether every write succeeded.
    async fn pass(&mut self, wanted: &Clusterset, found: &[crate::source::RecordedImport]) -> bool {
        if self.version.is_none() && !self.discover().await {
            return false;
        }
        let Some(version) = self.version else {
            return false;
        };
        let api_version = format!("{}/{version}", super::super::source::kubernetes::MCS_GROUP);
        let mut failing = Vec::new();
        let mut writes = Vec::new();
        let found: HashMap<(&str, &str), &crate::source::RecordedImport> = found
            .iter()
            .map(|r| ((r.namespace.as_str(), r.name.as_str()), r))
            .collect();
        for (key, import) in &wanted.imports {
            if let Some(r) = found.get(&(key.0.as_str(), key.1.as_str()))
                && !r.ours
            {
                failing.push(self.foreign(format!("ServiceImport {}/{}", key.0, key.1)));
                continue;
            }
            let (main, status) = import_bodies(&api_version, key, import);
            let check = !self
                .applied
                .contains_key(&format!("import/{}/{}", key.0, key.1));
            writes.push(Write::Import {
                key: key.clone(),
                body: main,
                check,
            });
            writes.push(Write::ImportStatus {
                key: key.clone(),
                body: status,
            });
        }
        let now = now_rfc3339();
        for (key, conditions) in &wanted.exports {
            if key.cluster != self.cluster {
                continue;
            }
            let ns_name = (key.namespace.clone(), key.name.clone());
            let known = self.transitions.entry(ns_name).or_default();
            let body = export_body(&api_version, key, conditions, known, &now);
            writes.push(Write::Export {
                key: key.clone(),
                body,
            });
        }
        if wanted.complete {
            for ((ns, name), r) in &found {
                if r.ours
                    && !wanted
                        .imports
                        .contains_key(&((*ns).to_owned(), (*name).to_owned()))
                {
                    writes.push(Write::Delete {
                        key: ((*ns).to_owned(), (*name).to_owned()),
                    });
                }
            }
        }
        // What was applied already and has not changed is not sent again.
        writes.retain(|w| match w {
            Write::Import { body, .. }
            | Write::ImportStatus { body, .. }
            | Write::Export { body, .. } => self.applied.get(&w.memo()) != Some(body),
            Write::Delete { .. } => true,
        });

        // A ServiceImport's status goes after its main resource: applied to
        // an import that does not exist yet, it would be a 404.
        let (statuses, first): (Vec<Write>, Vec<Write>) = writes
            .into_iter()
            .partition(|w| matches!(w, Write::ImportStatus { .. }));
        let mut results = send_all(&self.client, version, first).await;
        let created_failed: std::collections::HashSet<String> = results
            .iter()
            .filter(|(w, r)| r.is_err() && matches!(w, Write::Import { .. }))
            .map(|(w, _)| w.object())
            .collect();
        let statuses = statuses
            .into_iter()
            .filter(|w| !created_failed.contains(&w.object()))
            .collect();
        results.extend(send_all(&self.client, version, statuses).await);
        let mut gone = false;
        for (w, r) in results {
            match r {
                Ok(()) => {
                    self.report.writes += 1;
                    match &w {
                        Write::Import { body, .. }
                        | Write::ImportStatus { body, .. }
                        | Write::Export { body, .. } => {
                            if let Write::Export { key, .. } = &w {
                                self.remember_transitions(key, body);
                            }
                            self.applied.insert(w.memo(), body.clone());
                        }
                        Write::Delete { key } => {
                            self.applied.remove(&format!("import/{}/{}", key.0, key.1));
                            self.applied
                                .remove(&format!("import-status/{}/{}", key.0, key.1));
                        }
                    }
                }
                // The export went away meanwhile: the next build drops it.
                Err(Failure::Api(kube::Error::Api(s)))
                    if s.code == 404
                        && matches!(w, Write::Export { .. } | Write::Delete { .. }) => {}
                Err(Failure::Foreign) => failing.push(self.foreign(w.object())),
                Err(Failure::Api(e)) => {
                    if let kube::Error::Api(s) = &e
                        && s.code == 404
                        && s.message.contains("could not find the requested resource")
                    {
                        gone = true;
                    }
                    failing.push(self.error(w.object(), w.field(), error_text(&e)));
                }
            }
        }
        if gone {
            // The version we write is no longer served: find out again.
            self.version = None;
        }
        let failed_imports: std::collections::HashSet<&str> = failing
            .iter()
            .filter(|f| f.object.starts_with("ServiceImport "))
            .map(|f| f.object.as_str())
            .collect();
        self.report.imports = wanted.imports.len().saturating_sub(failed_imports.len());
        self.report.exports = wanted
            .exports
            .keys()
            .filter(|k| k.cluster == self.cluster)
            .count();
        let ok = failing.is_empty();
        for f in &failing {
            tracing::warn!(cluster = %self.cluster, object = %f.object, field = %f.field, "writing the clusterset: {}", f.message);
        }
        self.report.failing = failing;
        if ok {
            self.report.in_sync_at_unix = Some(unix_now());
        }
        ok
    }

    /// Finds the MCS version served and what the ServiceExports' conditions
    /// say now (their transition times are kept). Whether one is served.
    async fn discover(&mut self) -> bool {
        match served_mcs_version(&self.client, "ServiceImport").await {
            Ok(Some(version)) => {
                self.version = Some(version);
                self.report.api_version = Some(format!(
                    "{}/{version}",
                    crate::source::kubernetes::MCS_GROUP
                ));
                self.applied.clear();
                self.learn_transitions(version).await;
                true
            }
            Ok(None) => {
                self.report.api_version = None;
                self.report.failing = vec![self.error(
                    "ServiceImport".into(),
                    "",
                    "the API server serves no MCS API (multicluster.x-k8s.io v1beta1 or v1alpha1): \
                     install its CRDs to have ServiceImports written"
                        .into(),
                )];
                false
            }
            Err(e) => {
                self.report.failing = vec![self.error("ServiceImport".into(), "", error_text(&e))];
                false
            }
        }
    }

    /// Reads the current ServiceExport conditions: a condition whose status
    /// does not change keeps its `lastTransitionTime`.
    async fn learn_transitions(&mut self, version: &str) {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &mcs_resource("ServiceExport", version));
        let Ok(list) = api.list(&ListParams::default()).await else {
            return;
        };
        for e in list {
            let key = (e.namespace().unwrap_or_default(), e.name_any());
            let conditions = e
                .data
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let known = self.transitions.entry(key).or_default();
            for c in conditions {
                if let (Some(t), Some(s), Some(at)) = (
                    c["type"].as_str(),
                    c["status"].as_str(),
                    c["lastTransitionTime"].as_str(),
                ) {
                    known.insert(t.to_owned(), (s.to_owned(), at.to_owned()));
                }
            }
        }
    }

    fn remember_transitions(&mut self, key: &ServiceKey, body: &Value) {
        let known = self
            .transitions
            .entry((key.namespace.clone(), key.name.clone()))
            .or_default();
        for c in body
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(t), Some(s), Some(at)) = (
                c["type"].as_str(),
                c["status"].as_str(),
                c["lastTransitionTime"].as_str(),
            ) {
                known.insert(t.to_owned(), (s.to_owned(), at.to_owned()));
            }
        }
    }

    /// A ServiceImport we may not write: another implementation's.
    fn foreign(&self, object: String) -> ObjectError {
        self.error(
            object,
            "metadata.labels",
            format!(
                "exists without the label {}={}: another implementation manages it; left alone",
                super::MANAGED_BY.0,
                super::MANAGED_BY.1
            ),
        )
    }

    fn error(&self, object: String, field: &str, message: String) -> ObjectError {
        ObjectError {
            source: format!("write-back:{}", self.cluster),
            object,
            field: field.to_owned(),
            message,
        }
    }
}

/// The ServiceImport `key` as applied to the main resource and to its
/// status subresource.
fn import_bodies(api_version: &str, key: &(String, String), import: &Import) -> (Value, Value) {
    let main = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": {
            "name": key.1,
            "namespace": key.0,
            "labels": import.labels,
            "annotations": import.annotations,
        },
        "spec": import.spec,
    });
    let clusters: Vec<Value> = import
        .clusters
        .iter()
        .map(|c| json!({ "cluster": c }))
        .collect();
    let status = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": {"name": key.1, "namespace": key.0},
        "status": {"clusters": clusters},
    });
    (main, status)
}

/// The ServiceExport `key`'s conditions as applied: a condition whose status
/// is the one `known` keeps its transition time, else it moves to `now`.
fn export_body(
    api_version: &str,
    key: &ServiceKey,
    conditions: &ExportConditions,
    known: &BTreeMap<String, Transition>,
    now: &str,
) -> Value {
    let list: Vec<Value> = conditions
        .0
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let at = match known.get(c.kind) {
                Some((s, at)) if s == status => at.clone(),
                _ => now.to_owned(),
            };
            json!({
                "type": c.kind,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": at,
            })
        })
        .collect();
    json!({
        "apiVersion": api_version,
        "kind": "ServiceExport",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": {"conditions": list},
    })
}

/// Why a write was not done.
#[derive(Debug)]
enum Failure {
    /// The API server refused it or could not be reached.
    Api(kube::Error),
    /// The ServiceImport exists and another implementation manages it.
    Foreign,
}

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Failure::Api(e)
    }
}

/// Sends `writes`, [`CONCURRENCY`] at a time, each with its result.
async fn send_all(
    client: &Client,
    version: &str,
    writes: Vec<Write>,
) -> Vec<(Write, Result<(), Failure>)> {
    futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter(writes.into_iter().map(|w| async move {
            let r = apply(client, version, &w).await;
            (w, r)
        })),
        CONCURRENCY,
    ))
    .await
}

/// Sends one write.
async fn apply(client: &Client, version: &str, w: &Write) -> Result<(), Failure> {
    let apply = PatchParams::apply(FIELD_MANAGER);
    let imports = |ns: &str| -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), ns, &mcs_resource("ServiceImport", version))
    };
    match w {
        Write::Import { key, body, check } => {
            if *check
                && let Some(current) = imports(&key.0).get_opt(&key.1).await?
                && current
                    .labels()
                    .get(super::MANAGED_BY.0)
                    .map(String::as_str)
                    != Some(super::MANAGED_BY.1)
            {
                return Err(Failure::Foreign);
            }
            imports(&key.0)
                .patch(&key.1, &apply, &Patch::Apply(body))
                .await?;
        }
        Write::ImportStatus { key, body } => {
            imports(&key.0)
                .patch_status(&key.1, &apply, &Patch::Apply(body))
                .await?;
        }
        Write::Export { key, body } => {
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                &key.namespace,
                &mcs_resource("ServiceExport", version),
            );
            api.patch_status(&key.name, &apply, &Patch::Apply(body))
                .await?;
        }
        Write::Delete { key } => {
            imports(&key.0)
                .delete(&key.1, &DeleteParams::default())
                .await?;
        }
    }
    Ok(())
}

fn error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}): {}", s.reason, s.code, s.message),
        other => other.to_string(),
    }
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| now.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcs::Condition;

    fn conditions(conflict: bool) -> ExportConditions {
        let c = |kind, status, reason: &str| Condition {
            kind,
            status,
            reason: reason.into(),
            message: String::new(),
        };
        ExportConditions([
            c("Valid", true, "Valid"),
            c("Ready", true, "Exported"),
            if conflict {
                c("Conflict", true, "PortConflict")
            } else {
                c("Conflict", false, "NoConflicts")
            },
        ])
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_stays() {
        let key = ServiceKey::new("east", "shop", "web");
        let v = "multicluster.x-k8s.io/v1beta1";
        let first = export_body(v, &key, &conditions(false), &BTreeMap::new(), "T1");
        let mut known = BTreeMap::new();
        for c in first["status"]["conditions"].as_array().expect("list") {
            known.insert(
                c["type"].as_str().expect("type").to_owned(),
                (
                    c["status"].as_str().expect("status").to_owned(),
                    c["lastTransitionTime"].as_str().expect("time").to_owned(),
                ),
            );
        }
        let same = export_body(v, &key, &conditions(false), &known, "T2");
        assert_eq!(
            same, first,
            "nothing changed: the same body, nothing to write"
        );
        let flipped = export_body(v, &key, &conditions(true), &known, "T3");
        let times: Vec<&str> = flipped["status"]["conditions"]
            .as_array()
            .expect("list")
            .iter()
            .map(|c| c["lastTransitionTime"].as_str().expect("time"))
            .collect();
        assert_eq!(times, ["T1", "T1", "T3"]);
    }
}
