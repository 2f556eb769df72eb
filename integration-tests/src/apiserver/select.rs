//! Label and field selectors, as `labelSelector=` and `fieldSelector=`
//! spell them: comma-separated requirements `k=v`, `k==v`, `k!=v`, `k`,
//! `!k`, `k in (a,b)`, `k notin (a,b)`; fields: `metadata.name` and
//! `metadata.namespace` with `=`, `==`, `!=`.

use serde_json::Value;

/// A parsed label or field selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    /// Parses a label selector.
    pub fn labels(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            out.push(requirement(part)?);
        }
        Ok(Self(out))
    }

    /// Parses a field selector (only equality on metadata.name and metadata.namespace).
    pub fn fields(s: &str) -> Result<Self, String> {
        let sel = Self::labels(s)?;
        for r in &sel.0 {
            match r {
                Requirement::Equals(k, _) | Requirement::NotEquals(k, _)
                    if k == "metadata.name" || k == "metadata.namespace" => {}
                _ => return Err(format!("field selector {s:?} is not supported")),
            }
        }
        Ok(sel)
    }

    /// Whether `obj`'s labels match.
    pub fn matches_labels(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.matches(get)
    }

    /// Whether `obj`'s metadata fields match.
    pub fn matches_fields(&self, obj: &Value) -> bool {
        let get = |k: &str| match k {
            "metadata.name" => obj.pointer("/metadata/name").and_then(Value::as_str),
            "metadata.namespace" => obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .or(Some("")),
            _ => None,
        };
        self.matches(get)
    }

    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        })
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn requirement(part: &str) -> Result<Requirement, String> {
    let bad = || format!("invalid selector requirement {part:?}");
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = part.split_once(op) {
            let values = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?
                .split(',')
                .map(|v| v.trim().to_owned())
                .collect();
            let k = k.trim().to_owned();
            return Ok(if notin {
                Requirement::NotIn(k, values)
            } else {
                Requirement::In(k, values)
            });
        }
    }
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement::NotExists(k.trim().into()));
    }
    if part.contains(|c: char| c.is_whitespace() || "()!=".contains(c)) {
        return Err(bad());
    }
    Ok(Requirement::Exists(part.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match_like_the_api() {
        let obj = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (api, web)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
        ] {
            let s = Selector::labels(sel).expect(sel);
            assert_eq!(s.matches_labels(&obj), want, "{sel}");
        }
        let f = Selector::fields("metadata.name=a,metadata.namespace!=other").expect("fields");
        assert!(f.matches_fields(&obj));
        assert!(Selector::fields("spec.type=x").is_err());
        assert!(Selector::labels("a b").is_err());
    }
}
