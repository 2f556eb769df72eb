//! Messages in parts. Rule 7 of the contract: an update larger than a part
//! arrives as several messages with one nonce, `continued` set on all but
//! the last, and is applied (and answered) once. Rule 9: a Hello that
//! announces many resource versions goes as several Hellos, `continued` set
//! on all but the last, so no message comes near the control plane's bound.

use std::collections::HashMap;

use crate::v1::{self, agent_message};

/// Names and versions announced per Hello part (protocol rule 9).
pub const HELLO_PART_BYTES: usize = crate::codec::HELLO_PART_BYTES;

/// Sends `hello` with `announced`, in parts, on `tx` from a task of its
/// own: the control plane answers the call only once it has read the whole
/// Hello, so the parts must flow while the call starts (the stream's
/// channel holds only a few).
pub fn feed_hello(
    hello: &v1::Hello,
    announced: HashMap<String, String>,
    tx: tokio::sync::mpsc::Sender<v1::AgentMessage>,
) {
    let parts = hello_parts(hello, announced);
    tokio::spawn(async move {
        for part in parts {
            if tx.send(part).await.is_err() {
                return;
            }
        }
    });
}

/// `hello` with `announced` as its resource versions, in parts that each
/// encode to at most [`HELLO_PART_BYTES`] (always at least one part; a
/// name too long for any part goes alone).
pub fn hello_parts(hello: &v1::Hello, announced: HashMap<String, String>) -> Vec<v1::AgentMessage> {
    let part = |versions| v1::Hello {
        initial_resource_versions: versions,
        continued: true,
        ..hello.clone()
    };
    let message = |h| v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(h)),
    };
    // A part without versions, plus the two bytes the Hello's own length
    // takes once it is over 127 bytes.
    let fixed = prost::Message::encoded_len(&message(part(HashMap::new()))) + 2;
    let room = HELLO_PART_BYTES.saturating_sub(fixed);
    let mut parts = Vec::new();
    let mut current = HashMap::new();
    let mut bytes = 0;
    for (name, version) in announced {
        let size = entry_len(&name, &version);
        if !current.is_empty() && bytes + size > room {
            parts.push(part(std::mem::take(&mut current)));
            bytes = 0;
        }
        bytes += size;
        current.insert(name, version);
    }
    parts.push(part(current));
    if let Some(last) = parts.last_mut() {
        last.continued = false;
    }
    parts.into_iter().map(message).collect()
}

/// What one `initial_resource_versions` entry adds to a Hello's encoding
/// (field 4: its tag, its length, then key and value as fields 1 and 2;
/// prost leaves out an empty key or value, so this is an upper bound).
fn entry_len(name: &str, version: &str) -> usize {
    use prost::encoding::encoded_len_varint as varint;
    let field = |len: usize| 1 + varint(len as u64) + len;
    let entry = field(name.len()) + field(version.len());
    1 + varint(entry as u64) + entry
}

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
        Some(acc) => {
            tracing::warn!(nonce = %acc.nonce, "abandoning an update whose last part never came");
            part
        }
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

    #[test]
    fn a_large_announcement_goes_in_small_hello_parts() {
        let hello = v1::Hello {
            node_name: "node-a".into(),
            cluster_id: "default".into(),
            role: v1::Role::Agent as i32,
            ..Default::default()
        };
        let held: HashMap<String, String> = (0..10_000)
            .map(|i| {
                (
                    format!("default/ns-{}/svc-{i}", i % 100),
                    format!("{i:016x}"),
                )
            })
            .collect();
        let parts = hello_parts(&hello, held.clone());
        assert!(parts.len() > 10, "{} parts", parts.len());
        let mut union = HashMap::new();
        for (i, p) in parts.iter().enumerate() {
            let Some(agent_message::Kind::Hello(h)) = &p.kind else {
                panic!("a Hello")
            };
            assert_eq!(h.continued, i + 1 < parts.len());
            assert_eq!(h.node_name, "node-a");
            assert_eq!(h.role, v1::Role::Agent as i32);
            // Each part fits the control plane's decode buffer as it starts.
            let len = prost::Message::encoded_len(p);
            assert!(len <= HELLO_PART_BYTES, "part {i}: {len} bytes");
            assert!(
                len + crate::codec::GRPC_HEADER_BYTES <= crate::codec::SMALL_BUFFER_BYTES,
                "part {i}: {len} bytes"
            );
            // And is full: no part but the last has room for another entry.
            if i + 1 < parts.len() {
                assert!(len + 50 > HELLO_PART_BYTES, "part {i}: only {len} bytes");
            }
            union.extend(h.initial_resource_versions.clone());
        }
        assert_eq!(union, held);
        let empty = hello_parts(&hello, HashMap::new());
        assert_eq!(empty.len(), 1);
        // A name too long for a part goes alone, and nothing is lost.
        let long: HashMap<String, String> = [
            ("x".repeat(1500), "1".to_owned()),
            ("default/ns/a".to_owned(), "2".to_owned()),
        ]
        .into();
        let parts = hello_parts(&hello, long.clone());
        assert_eq!(parts.len(), 2);
        let mut union = HashMap::new();
        for p in &parts {
            let Some(agent_message::Kind::Hello(h)) = &p.kind else {
                panic!("a Hello")
            };
            union.extend(h.initial_resource_versions.clone());
        }
        assert_eq!(union, long);
    }
}
