//! Field ownership and server-side apply, as the API server keeps them
//! where Switchyard depends on them (it writes ServiceImports and
//! ServiceExport conditions with server-side apply, and must never take
//! over what another manager owns).
//!
//! ```text
//!  every write records who set which fields: metadata.managedFields, one
//!  entry per (manager, operation, subresource), the fields as FieldsV1
//!  apply(object, manager, force):
//!    a field the object gives that another manager owns with another value ─▶ 409 Conflict (unless force)
//!    fields this manager applied before and no longer applies             ─▶ removed (unless another owns them)
//!    the applied fields are set; the manager owns exactly them
//! ```
//!
//! Lists are atomic (one field), except the two keyed lists the MCS API
//! declares (`+listType=map`): `conditions` by `type` and `clusters` by
//! `cluster`, whose entries are owned one by one. Bookkeeping metadata
//! (`name`, `namespace`, `uid`, `resourceVersion`, `generation`,
//! `creationTimestamp`, `managedFields`) and `apiVersion`/`kind` are
//! nobody's. On a kind with a status subresource, the main resource's
//! writes own no `status` field and the `/status` writes own only those.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    /// A field of an object.
    F(String),
    /// The entry of a keyed list whose key field has this (JSON) value.
    K(String, String),
}

/// A field: the steps from the object's root.
pub type Path = Vec<Seg>;

/// The key field of a keyed list at `field`, if it is one.
fn list_key(field: &str) -> Option<&'static str> {
    match field {
        "conditions" => Some("type"),
        "clusters" => Some("cluster"),
        _ => None,
    }
}

const BOOKKEEPING: [&str; 7] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
];

/// Which part of an object a write may own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every field (a kind without a status subresource).
    All,
    /// All but `status` (the main resource of a kind with one).
    Main,
    /// `status` only (the `/status` subresource).
    Status,
}

impl Scope {
    fn admits(self, path: &[Seg]) -> bool {
        let status = matches!(path.first(), Some(Seg::F(f)) if f == "status");
        match self {
            Scope::All => true,
            Scope::Main => !status,
            Scope::Status => status,
        }
    }

    fn subresource(self) -> Option<&'static str> {
        (self == Scope::Status).then_some("status")
    }
}

/// Every field `obj` sets, with its value.
pub fn leaves(obj: &Value, scope: Scope) -> BTreeMap<Path, Value> {
    let mut out = BTreeMap::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            walk(&mut vec![Seg::F(k.clone())], v, &mut out);
        }
    }
    out.retain(|p, _| scope.admits(p) && !bookkeeping(p));
    out
}

fn bookkeeping(p: &[Seg]) -> bool {
    matches!(p, [Seg::F(m), Seg::F(f), ..] if m == "metadata" && BOOKKEEPING.contains(&f.as_str()))
}

fn walk(path: &mut Path, v: &Value, out: &mut BTreeMap<Path, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(Seg::F(k.clone()));
                walk(path, child, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let key = match path.last() {
                Some(Seg::F(f)) => list_key(f),
                _ => None,
            };
            match key {
                Some(key) if items.iter().all(|i| i.get(key).is_some()) => {
                    for item in items {
                        path.push(Seg::K(key.to_owned(), item[key].to_string()));
                        walk(path, item, out);
                        path.pop();
                    }
                }
                _ => {
                    out.insert(path.clone(), v.clone());
                }
            }
        }
        _ => {
            out.insert(path.clone(), v.clone());
        }
    }
}

/// Whether `item` is the keyed entry whose `key` field is `want` (JSON).
fn keyed(item: &Value, key: &str, want: &str) -> bool {
    item.get(key)
        .is_some_and(|v| serde_json::to_string(v).is_ok_and(|s| s == want))
}

/// The value at `path` in `obj`, if it is there.
pub fn get<'a>(obj: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut at = obj;
    for seg in path {
        at = match seg {
            Seg::F(f) => at.get(f)?,
            Seg::K(key, want) => at.as_array()?.iter().find(|i| keyed(i, key, want))?,
        };
    }
    Some(at)
}

/// Sets `value` at `path`, making the objects and keyed entries on the way.
pub fn set(obj: &mut Value, path: &[Seg], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = obj;
    for seg in parents {
        at = step_mut(at, seg);
    }
    match last {
        Seg::F(f) => {
            if !at.is_object() {
                *at = Value::Object(Map::new());
            }
            at[f.as_str()] = value;
        }
        Seg::K(..) => *step_mut(at, last) = value,
    }
}

fn step_mut<'a>(at: &'a mut Value, seg: &Seg) -> &'a mut Value {
    match seg {
        Seg::F(f) => {
            if !at.is_object() {
                *at = Value::Object(Map::new());
            }
            let m = at.as_object_mut().expect("an object");
            m.entry(f.clone()).or_insert(Value::Null)
        }
        Seg::K(key, want) => {
            if !at.is_array() {
                *at = Value::Array(Vec::new());
            }
            let items = at.as_array_mut().expect("an array");
            let i = match items.iter().position(|i| keyed(i, key, want)) {
                Some(i) => i,
                None => {
                    let k: Value = serde_json::from_str(want).unwrap_or(Value::Null);
                    items.push(json!({ key.as_str(): k }));
                    items.len() - 1
                }
            };
            &mut items[i]
        }
    }
}

/// Removes the field at `path`, and a keyed entry left with only its key.
pub fn remove(obj: &mut Value, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    // The key field of a keyed entry: the entry goes.
    if let (Seg::F(f), Some((Seg::K(key, _), _))) = (last, parents.split_last())
        && f == key
    {
        remove(obj, parents);
        return;
    }
    let Some(parent) = get_mut(obj, parents) else {
        return;
    };
    match last {
        Seg::F(f) => {
            if let Some(m) = parent.as_object_mut() {
                m.remove(f);
            }
        }
        Seg::K(key, want) => {
            if let Some(items) = parent.as_array_mut() {
                items.retain(|i| !keyed(i, key, want));
            }
        }
    }
    // A keyed entry that holds nothing but its key goes too.
    if let Some((Seg::K(key, _), _)) = parents.split_last()
        && parent
            .as_object()
            .is_some_and(|m| m.keys().all(|k| k == key))
    {
        let (entry, above) = parents.split_last().expect("a parent");
        if let Some(list) = get_mut(obj, above)
            && let (Some(items), Seg::K(key, want)) = (list.as_array_mut(), entry)
        {
            items.retain(|i| !keyed(i, key, want));
        }
    }
}

fn get_mut<'a>(obj: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut at = obj;
    for seg in path {
        at = match seg {
            Seg::F(f) => at.get_mut(f)?,
            Seg::K(key, want) => at
                .as_array_mut()?
                .iter_mut()
                .find(|i| keyed(i, key, want))?,
        };
    }
    Some(at)
}

/// FieldsV1 of `paths`: `{"f:spec": {"f:ports": {}}, "f:status": {"f:conditions": {"k:{\"type\":\"Valid\"}": {...}}}}`.
pub fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut at = &mut root;
        for seg in p {
            let name = match seg {
                Seg::F(f) => format!("f:{f}"),
                Seg::K(key, v) => format!("k:{{\"{key}\":{v}}}"),
            };
            at = at
                .entry(name)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("an object");
        }
    }
    Value::Object(root)
}

/// The paths a FieldsV1 document names (its leaves).
pub fn parse_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, child) in m {
            let seg = if let Some(f) = k.strip_prefix("f:") {
                Seg::F(f.to_owned())
            } else if let Some(kv) = k.strip_prefix("k:") {
                let Ok(Value::Object(kv)) = serde_json::from_str::<Value>(kv) else {
                    continue;
                };
                let Some((key, val)) = kv.into_iter().next() else {
                    continue;
                };
                Seg::K(key, val.to_string())
            } else {
                continue;
            };
            path.push(seg);
            go(child, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    /// The field manager.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `status`, or none for the main resource.
    pub subresource: Option<String>,
    /// What it owns.
    pub fields: BTreeSet<Path>,
}

/// The entries of `obj`'s `metadata.managedFields`.
pub fn managed(obj: &Value) -> Vec<Managed> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Managed {
            manager: e["manager"].as_str().unwrap_or_default().to_owned(),
            operation: e["operation"].as_str().unwrap_or_default().to_owned(),
            subresource: e["subresource"].as_str().map(str::to_owned),
            fields: parse_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

fn write_managed(obj: &mut Value, entries: &[Managed], api_version: &str) {
    let now = super::store::now_rfc3339();
    let before: Vec<Value> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": api_version,
                "time": now, "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&e.fields),
            });
            if let Some(s) = &e.subresource {
                v["subresource"] = json!(s);
            }
            // An entry that did not change keeps its time and version (a
            // write that changes nothing else is then a no-op).
            let same = |o: &&Value| {
                ["manager", "operation", "subresource", "fieldsV1"]
                    .iter()
                    .all(|k| o.get(k) == v.get(k))
            };
            if let Some(old) = before.iter().find(same) {
                v["time"] = old["time"].clone();
                v["apiVersion"] = old["apiVersion"].clone();
            }
            v
        })
        .collect();
    obj["metadata"]["managedFields"] = Value::Array(list);
}

/// A field another manager owns with another value than applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Who owns it.
    pub manager: String,
    /// The field, as `.spec.ips`.
    pub field: String,
}

/// `path` as the API server names a conflicting field.
pub fn show(path: &[Seg]) -> String {
    path.iter()
        .map(|s| match s {
            Seg::F(f) => format!(".{f}"),
            Seg::K(k, v) => format!("[{k}={v}]"),
        })
        .collect()
}

/// Server-side apply of `applied` by `manager` onto `current` (none: the
/// object is created), in `scope`: see the module docs.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
    api_version: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut obj = current.cloned().unwrap_or_else(|| json!({}));
    let mut entries = managed(&obj);
    let want = leaves(applied, scope);
    let subresource = scope.subresource().map(str::to_owned);
    let mine = |e: &Managed| {
        e.manager == manager && e.operation == "Apply" && e.subresource == subresource
    };
    let mut conflicts = Vec::new();
    for (path, value) in &want {
        if get(&obj, path) == Some(value) {
            continue;
        }
        for e in entries.iter().filter(|e| !mine(e)) {
            if e.fields.iter().any(|f| overlaps(f, path)) {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    field: show(path),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let before: BTreeSet<Path> = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let wanted: BTreeSet<Path> = want.keys().cloned().collect();
    // Another manager keeps a field with the same value (shared), or loses
    // it when forced.
    for e in entries.iter_mut().filter(|e| !mine(e)) {
        e.fields.retain(|f| {
            !want
                .iter()
                .any(|(p, v)| overlaps(f, p) && force && get(applied, p) == Some(v))
        });
    }
    for gone in before.difference(&wanted) {
        let others = entries
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.iter().any(|f| overlaps(f, gone)));
        if !others {
            remove(&mut obj, gone);
        }
    }
    for (path, value) in want {
        set(&mut obj, &path, value);
    }
    entries.retain(|e| !mine(e));
    entries.push(Managed {
        manager: manager.to_owned(),
        operation: "Apply".into(),
        subresource,
        fields: wanted,
    });
    write_managed(&mut obj, &entries, api_version);
    Ok(obj)
}

/// Records an ordinary write (create, update, patch) by `manager`: it owns
/// the fields whose value it set or changed, and the others lose them.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
) {
    let mut entries = old.map(managed).unwrap_or_default();
    let before = old.map(|o| leaves(o, scope)).unwrap_or_default();
    let after = leaves(new, scope);
    let changed: BTreeSet<Path> = after
        .iter()
        .filter(|(p, v)| before.get(*p) != Some(*v))
        .map(|(p, _)| p.clone())
        .collect();
    let subresource = scope.subresource().map(str::to_owned);
    for e in &mut entries {
        e.fields
            .retain(|f| after.contains_key(f) || !scope.admits(f));
        if !(e.manager == manager && e.operation == "Update" && e.subresource == subresource) {
            e.fields.retain(|f| !changed.contains(f));
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(e) => e.fields.extend(changed),
            None => entries.push(Managed {
                manager: manager.to_owned(),
                operation: "Update".into(),
                subresource,
                fields: changed,
            }),
        }
    }
    write_managed(new, &entries, api_version);
}

/// Whether two fields are the same or one holds the other.
fn overlaps(a: &[Seg], b: &[Seg]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(ips: &[&str]) -> Value {
        json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "ClusterSetIP", "ips": ips, "ports": [{"port": 80, "protocol": "TCP"}]}})
    }

    #[test]
    fn an_applier_owns_what_it_applies_and_conflicts_with_another_owner() {
        let v = "multicluster.x-k8s.io/v1beta1";
        let a = apply(
            None,
            &import(&["10.1.0.1"]),
            "switchyard",
            false,
            Scope::Main,
            v,
        )
        .expect("created");
        let m = managed(&a);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].fields
                .contains(&vec![Seg::F("spec".into()), Seg::F("ips".into())])
        );
        // The same manager changes its own field.
        let b = apply(
            Some(&a),
            &import(&["10.1.0.2"]),
            "switchyard",
            false,
            Scope::Main,
            v,
        )
        .expect("its own");
        assert_eq!(b["spec"]["ips"], json!(["10.1.0.2"]));
        // Another manager applying another value conflicts; the same value is shared.
        let err = apply(
            Some(&b),
            &import(&["10.9.9.9"]),
            "other",
            false,
            Scope::Main,
            v,
        )
        .expect_err("a conflict");
        assert!(
            err.iter()
                .any(|c| c.manager == "switchyard" && c.field == ".spec.ips")
        );
        let shared = apply(
            Some(&b),
            &import(&["10.1.0.2"]),
            "other",
            false,
            Scope::Main,
            v,
        )
        .expect("same values");
        assert_eq!(managed(&shared).len(), 2);
        // Forced: it takes the field over.
        let forced = apply(
            Some(&b),
            &import(&["10.9.9.9"]),
            "other",
            true,
            Scope::Main,
            v,
        )
        .expect("forced");
        assert_eq!(forced["spec"]["ips"], json!(["10.9.9.9"]));
    }

    #[test]
    fn keyed_conditions_are_owned_one_by_one_and_dropped_ones_are_removed() {
        let v = "multicluster.x-k8s.io/v1beta1";
        let cond =
            |t: &str, s: &str| json!({"type": t, "status": s, "reason": "R", "message": "m"});
        let status = |conds: Vec<Value>| json!({"status": {"conditions": conds}});
        let a = apply(
            Some(&json!({"metadata": {"name": "web"}})),
            &status(vec![cond("Valid", "True"), cond("Conflict", "False")]),
            "switchyard",
            false,
            Scope::Status,
            v,
        )
        .expect("applied");
        // Another controller's own condition type: no conflict.
        let b = apply(
            Some(&a),
            &status(vec![cond("Other", "True")]),
            "them",
            false,
            Scope::Status,
            v,
        )
        .expect("another type");
        assert_eq!(b["status"]["conditions"].as_array().map(Vec::len), Some(3));
        // We stop applying Conflict: it goes, theirs stays.
        let c = apply(
            Some(&b),
            &status(vec![cond("Valid", "False")]),
            "switchyard",
            false,
            Scope::Status,
            v,
        )
        .expect("applied");
        let types: Vec<&str> = c["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Valid", "Other"]);
        // The main resource's apply owns no status field.
        assert!(
            leaves(&c, Scope::Main)
                .keys()
                .all(|p| p[0] != Seg::F("status".into()))
        );
    }

    #[test]
    fn an_entry_that_holds_only_its_key_goes_when_no_longer_applied() {
        let v = "multicluster.x-k8s.io/v1beta1";
        let clusters = |names: &[&str]| {
            let list: Vec<Value> = names.iter().map(|c| json!({ "cluster": c })).collect();
            json!({"status": {"clusters": list}})
        };
        let a = apply(
            None,
            &clusters(&["east", "west"]),
            "switchyard",
            false,
            Scope::Status,
            v,
        )
        .expect("applied");
        let b = apply(
            Some(&a),
            &clusters(&["west"]),
            "switchyard",
            false,
            Scope::Status,
            v,
        )
        .expect("applied");
        assert_eq!(b["status"]["clusters"], json!([{"cluster": "west"}]));
    }

    #[test]
    fn an_ordinary_write_owns_what_it_set() {
        let v = "v1";
        let mut created = import(&["10.1.0.1"]);
        record_update(None, &mut created, "kubectl-create", Scope::Main, v);
        let err = apply(
            Some(&created),
            &import(&["10.1.0.9"]),
            "switchyard",
            false,
            Scope::Main,
            v,
        )
        .expect_err("owned by the creator");
        assert_eq!(err[0].manager, "kubectl-create");
        let fields = parse_fields_v1(&fields_v1(&managed(&created)[0].fields));
        assert_eq!(fields, managed(&created)[0].fields, "FieldsV1 round trip");
    }
}
