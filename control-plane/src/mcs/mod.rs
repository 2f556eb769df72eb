//! The clusterset written back into every member cluster, as an MCS API
//! implementation must (KEP-1645, MCS API v0.5): a `ServiceImport` per
//! import in the Service's namespace of each cluster, and the conditions
//! `Valid`, `Ready` and `Conflict` on each `ServiceExport`.
//!
//! ```text
//!  index build ─▶ Clusterset::of(snapshot, issues, exports) ─▶ watch ─▶ one writer per kube source
//!                 (pure: what every cluster should hold)                  (writer.rs: server-side
//!                                                                          apply, retries, /status)
//! ```
//!
//! This module is pure: it says what the API objects should hold, from
//! the snapshot's clusterset range (the imports as agents receive them:
//! addresses, ports, type, affinity, traffic policy), the build's
//! clusterset issues and every source's exports. Two control planes given
//! the same inputs want the same objects, so replicas writing with the
//! same field manager never undo each other.
//!
//! The clusterset reaches the writers through a second watch channel of the
//! index (`index::Outputs::clusterset`, made only while a writer listens),
//! and each kube source spawns one writer (`--mcs-write`, default on) with
//! a client of its own: not the watches', whose answers clear watch errors.
//! The ServiceImport of each import comes from the snapshot's
//! `clusterset/` range (decoded once per changed resource by
//! [`ImportCache`]), its `status.clusters` and the oldest export's exported
//! labels and annotations from the sources' exports. Each export's three
//! conditions come from the build's clusterset issues: `NoService` and
//! `InvalidServiceType` make `Valid` false, reasons ending in `Conflict`
//! make `Conflict` true (joined by commas), and `Ready` is `Exported` once
//! the import exists. How it goes is shown per cluster in `/status`
//! `write_back`.

pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_model::{CLUSTERSET, ServiceKey, ServiceState, TrafficPolicy};
use switchyard_proto::convert::decode_state_bytes;

use crate::merge::{self, ClustersetIssue};
use crate::snapshot::{Resource, Snapshot};
use crate::source::{Export, ExportedMeta};

/// The field manager of every write (server-side apply).
pub const FIELD_MANAGER: &str = "switchyard";

/// The label Switchyard puts on the ServiceImports it writes: only those
/// are updated, deleted and read back as the record of ClusterSet IPs.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "switchyard");

/// What every member cluster should hold, after one build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Clusterset {
    /// Whether every source had synced: until then nothing is deleted (a
    /// partial view would delete imports that still exist).
    pub complete: bool,
    /// The ServiceImport of each import, by (namespace, name).
    pub imports: BTreeMap<(String, String), Arc<Import>>,
    /// The conditions of each ServiceExport, by the exported Service.
    pub exports: BTreeMap<ServiceKey, Arc<ExportConditions>>,
}

/// One ServiceImport's content (the same in every cluster).
#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    /// `spec` as applied.
    pub spec: Value,
    /// `status.clusters`: the exporting clusters, in name order.
    pub clusters: Vec<String>,
    /// `metadata.labels`: the oldest export's exported labels and ours.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`: the oldest export's exported annotations.
    pub annotations: BTreeMap<String, String>,
    /// The addresses in `spec.ips` (for tests and `/status`).
    pub ips: Vec<IpAddr>,
}

/// One condition of a ServiceExport (a `metav1.Condition` without its
/// transition time, which the writer keeps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Valid`, `Ready` or `Conflict`.
    pub kind: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// The MCS API's reason (`Valid`, `NoService`, `PortConflict`, ...).
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

/// The conditions of one ServiceExport, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConditions(pub [Condition; 3]);

/// Reasons that make `Valid` false (the export cannot be used at all).
const INVALID: [&str; 2] = [merge::NO_SERVICE, merge::INVALID_SERVICE_TYPE];

impl Clusterset {
    /// What the clusters should hold after a build that made `snapshot`
    /// with `issues`, from the exports of every source (`exports`: each
    /// source's list). `cache` keeps the imports decoded by an earlier
    /// call, so a build costs the imports that changed.
    pub fn of<'a>(
        snapshot: &Snapshot,
        issues: &[ClustersetIssue],
        exports: impl IntoIterator<Item = &'a Export>,
        cache: &mut ImportCache,
    ) -> Self {
        let mut by_name: BTreeMap<(&str, &str), Vec<&Export>> = BTreeMap::new();
        for e in exports {
            by_name
                .entry((e.key.namespace.as_str(), e.key.name.as_str()))
                .or_default()
                .push(e);
        }
        for group in by_name.values_mut() {
            // Oldest first, as the merge orders them; unknown ages last.
            group.sort_by(|a, b| {
                (a.created_unix.unwrap_or(i64::MAX), &a.key.cluster)
                    .cmp(&(b.created_unix.unwrap_or(i64::MAX), &b.key.cluster))
            });
            group.dedup_by(|a, b| a.key == b.key);
        }
        let mut found: HashMap<(&str, &str, &str), Vec<&ClustersetIssue>> = HashMap::new();
        for i in issues {
            let (ns, name) = i.service.split_once('/').unwrap_or(("", &i.service));
            found
                .entry((i.cluster.as_str(), ns, name))
                .or_default()
                .push(i);
        }
        let invalid = |key: &ServiceKey| {
            found
                .get(&(
                    key.cluster.as_str(),
                    key.namespace.as_str(),
                    key.name.as_str(),
                ))
                .is_some_and(|is| is.iter().any(|i| INVALID.contains(&i.reason)))
        };

        let mut imports = BTreeMap::new();
        let mut seen = Vec::new();
        for (name, resource) in snapshot.range(CLUSTERSET) {
            let Some(state) = cache.decode(name, resource) else {
                continue;
            };
            let svc = &state.service;
            let key = (svc.key.namespace.clone(), svc.key.name.clone());
            let group = by_name
                .get(&(key.0.as_str(), key.1.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut clusters: Vec<String> = group
                .iter()
                .filter(|e| !invalid(&e.key))
                .map(|e| e.key.cluster.clone())
                .collect();
            // A relay's imports come with their slices' clusters only.
            clusters.extend(state.slices.iter().filter_map(|s| s.cluster.clone()));
            clusters.sort();
            clusters.dedup();
            let oldest = group.iter().find(|e| !invalid(&e.key)).map(|e| &e.exported);
            imports.insert(key, Arc::new(import(&state, clusters, oldest)));
            seen.push(name.clone());
        }
        cache.keep(&seen);

        let mut exports = BTreeMap::new();
        for group in by_name.values() {
            for e in group {
                let mine = found
                    .get(&(
                        e.key.cluster.as_str(),
                        e.key.namespace.as_str(),
                        e.key.name.as_str(),
                    ))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let imported = imports.contains_key(&(e.key.namespace.clone(), e.key.name.clone()));
                exports.insert(e.key.clone(), Arc::new(conditions(mine, imported)));
            }
        }
        Self {
            complete: snapshot.complete(),
            imports,
            exports,
        }
    }
}

/// The ServiceImport of one clusterset Service.
fn import(state: &ServiceState, clusters: Vec<String>, meta: Option<&ExportedMeta>) -> Import {
    let svc = &state.service;
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"protocol": p.protocol.to_string(), "port": p.port});
            if !p.name.is_empty() {
                port["name"] = json!(p.name);
            }
            port
        })
        .collect();
    let families: Vec<&str> = svc
        .cluster_ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let mut spec = json!({
        "type": if svc.headless { "Headless" } else { "ClusterSetIP" },
        "ports": ports,
        "sessionAffinity": if svc.session_affinity_timeout.is_some() { "ClientIP" } else { "None" },
    });
    if !svc.headless {
        spec["ips"] = json!(
            svc.cluster_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        spec["ipFamilies"] = json!(families);
    }
    if let Some(t) = svc.session_affinity_timeout {
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    spec["internalTrafficPolicy"] = json!(match svc.internal_traffic_policy {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    });
    if let Some(d) = &svc.traffic_distribution {
        spec["trafficDistribution"] = json!(d);
    }
    let mut labels = meta.map(|m| m.labels.clone()).unwrap_or_default();
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    Import {
        spec,
        clusters,
        labels,
        annotations: meta.map(|m| m.annotations.clone()).unwrap_or_default(),
        ips: if svc.headless {
            Vec::new()
        } else {
            svc.cluster_ips.clone()
        },
    }
}

/// The conditions of an export with the issues found about it, imported
/// (the clusterset Service exists) or not.
fn conditions(issues: &[&ClustersetIssue], imported: bool) -> ExportConditions {
    let cond = |kind, status, reason: &str, message: String| Condition {
        kind,
        status,
        reason: reason.to_owned(),
        message,
    };
    let invalid = issues.iter().find(|i| INVALID.contains(&i.reason));
    let valid = match invalid {
        Some(i) => cond("Valid", false, i.reason, i.message.clone()),
        None => cond(
            "Valid",
            true,
            "Valid",
            "the Service is exported to the clusterset".into(),
        ),
    };
    let ready = match (invalid, imported) {
        (None, true) => cond(
            "Ready",
            true,
            "Exported",
            "imported into every cluster of the clusterset".into(),
        ),
        (Some(_), _) => cond("Ready", false, "Failed", "the export is not valid".into()),
        (None, false) => {
            let why: Vec<&str> = issues
                .iter()
                .filter(|i| !merge::CONFLICT_REASONS.contains(&i.reason))
                .map(|i| i.message.as_str())
                .collect();
            let message = if why.is_empty() {
                "not imported yet".to_owned()
            } else {
                why.join("; ")
            };
            cond("Ready", false, "Pending", message)
        }
    };
    let conflicts: Vec<&&ClustersetIssue> = issues
        .iter()
        .filter(|i| merge::CONFLICT_REASONS.contains(&i.reason))
        .collect();
    let conflict = if conflicts.is_empty() {
        cond(
            "Conflict",
            false,
            "NoConflicts",
            "every export of the Service agrees".into(),
        )
    } else {
        let mut reasons: Vec<&str> = conflicts.iter().map(|i| i.reason).collect();
        reasons.dedup();
        let messages: Vec<&str> = conflicts.iter().map(|i| i.message.as_str()).collect();
        cond("Conflict", true, &reasons.join(","), messages.join("; "))
    };
    ExportConditions([valid, ready, conflict])
}

/// The clusterset's resources decoded by earlier builds, by name, with
/// the resource they came from: an unchanged resource (the same `Arc`) is
/// not decoded again.
#[derive(Debug, Default)]
pub struct ImportCache {
    decoded: HashMap<Arc<str>, (Arc<Resource>, Arc<ServiceState>)>,
}

impl ImportCache {
    fn decode(&mut self, name: &Arc<str>, resource: &Arc<Resource>) -> Option<Arc<ServiceState>> {
        if let Some((r, state)) = self.decoded.get(name)
            && Arc::ptr_eq(r, resource)
        {
            return Some(state.clone());
        }
        match decode_state_bytes(name, &resource.service_state) {
            Ok(state) => {
                let state = Arc::new(state);
                self.decoded
                    .insert(name.clone(), (resource.clone(), state.clone()));
                Some(state)
            }
            Err(e) => {
                // The index encoded it: not expected; the import is skipped.
                tracing::error!(resource = %name, error = %e, "cannot decode an import");
                None
            }
        }
    }

    fn keep(&mut self, names: &[Arc<str>]) {
        if self.decoded.len() != names.len() {
            let keep: std::collections::HashSet<&Arc<str>> = names.iter().collect();
            self.decoded.retain(|n, _| keep.contains(n));
        }
    }
}
