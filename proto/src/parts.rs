//! The receiving side of rule 7 of the contract: an update larger than a
//! part arrives as several messages with one nonce, `continued` set on all
//! but the last, and is applied (and answered) once.

use crate::v1;

/// Collects the parts of one update. Returns the whole update once its
/// last part arrived. A part with another nonce abandons an unfinished
/// update: the control plane never interleaves updates, so that only happens
/// after a protocol error, and the new update stands alone.
pub fn assemble(
    assembling: &mut Option<v1::SnapshotUpdate>,
    part: v1::SnapshotUpdate,
) -> Option<v1::SnapshotUpdate> {
    let update = match assembling.take() {
        Some(mut acc) if acc.nonce == part.nonce => {
            acc.resources.extend(part.resources);
            acc.removed_resources.extend(part.removed_resources);
            acc.continued = part.continued;
            acc
        }
        Some(_) => part,
        None => part,
    };
    if update.continued {
        *assembling = Some(update);
        None
    } else {
        Some(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(nonce: &str, names: &[&str], continued: bool) -> v1::SnapshotUpdate {
        v1::SnapshotUpdate {
            nonce: nonce.into(),
            snapshot_version: "v".into(),
            resources: names
                .iter()
                .map(|n| v1::Resource {
                    name: (*n).into(),
                    ..Default::default()
                })
                .collect(),
            continued,
            ..Default::default()
        }
    }

    #[test]
    fn parts_are_assembled_into_one_update() {
        let mut acc = None;
        assert!(assemble(&mut acc, part("1", &["a"], true)).is_none());
        assert!(assemble(&mut acc, part("1", &["b"], true)).is_none());
        let whole = assemble(&mut acc, part("1", &["c"], false)).expect("complete");
        let names: Vec<_> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(acc.is_none());
        assert!(assemble(&mut acc, part("2", &["x"], true)).is_none());
        let next = assemble(&mut acc, part("3", &["y"], false)).expect("complete");
        assert_eq!(next.nonce, "3");
        assert_eq!(next.resources.len(), 1);
    }
}
