//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902).
//!
//! A strategic merge patch (kubectl's default for built-in kinds) is applied
//! as a merge patch: lists are replaced whole instead of merged by key. That
//! is enough for the patches tests and people type (`spec`, labels,
//! annotations), and documented as a limit of the stand-in.

use serde_json::Value;

/// Applies an RFC 7386 merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Applies an RFC 6902 JSON patch (add, remove, replace, move, copy, test).
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {op} has no {name:?}"))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => add(target, path, value(op)?)?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                add(target, path, value(op)?)?;
            }
            "move" => {
                let v = remove(target, field("from")?)?;
                add(target, path, v)?;
            }
            "copy" => {
                let v = target
                    .pointer(field("from")?)
                    .cloned()
                    .ok_or("copy: no such path")?;
                add(target, path, v)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value(op)?) {
                    return Err(format!("test failed at {path}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn value(op: &Value) -> Result<Value, String> {
    op.get("value")
        .cloned()
        .ok_or_else(|| format!("operation {op} has no value"))
}

fn split(path: &str) -> Result<(&str, String), String> {
    let i = path
        .rfind('/')
        .ok_or_else(|| format!("bad path {path:?}"))?;
    let last = path[i + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..i], last))
}

fn add(target: &mut Value, path: &str, v: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = v;
        return Ok(());
    }
    let (parent, last) = split(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, v);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse().map_err(|_| format!("bad index in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            a.insert(i, v);
            Ok(())
        }
        _ => Err(format!("no such path {parent:?}")),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split(path)?;
    let missing = || format!("no such path {path:?}");
    match target.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or_else(missing),
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_and_json_patches() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut v, &json!({"a": {"b": null, "d": 3}, "l": [9]}));
        assert_eq!(v, json!({"a": {"c": 2, "d": 3}, "l": [9]}));
        json_patch(
            &mut v,
            &json!([
                {"op": "add", "path": "/l/-", "value": 10},
                {"op": "replace", "path": "/a/c", "value": 5},
                {"op": "remove", "path": "/a/d"},
                {"op": "test", "path": "/l/0", "value": 9},
                {"op": "copy", "from": "/a", "path": "/x~1y"},
            ]),
        )
        .expect("patch");
        assert_eq!(v, json!({"a": {"c": 5}, "l": [9, 10], "x/y": {"c": 5}}));
        assert!(json_patch(&mut v, &json!([{"op": "test", "path": "/l/0", "value": 1}])).is_err());
    }
}
