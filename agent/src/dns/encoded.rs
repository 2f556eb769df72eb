//! Encoded answers by query bytes. Over UDP, an answer from the index is a
//! function of the query's bytes after the two-byte ID, and of the index:
//! once hickory-server's encoder has made it, the next identical query gets
//! the same bytes with its own ID, without being parsed, decided or encoded
//! again. An answer relayed from the cache of upstream answers is the same
//! while that cache is unchanged and its TTLs have not counted down another
//! second.
//!
//! ```text
//!  datagram ─▶ answer(index, bytes) ─▶ hit: copy, the query's ID in ─▶ send
//!                                    └▶ miss: hickory-server parses, decide, encode ─▶ put ─▶ send
//! ```
//!
//! Kept: answers for a source the access list allows (a refused answer
//! depends on the source); nothing for a message that did not parse, nor an
//! answer that waited for an upstream. The key holds the question in the
//! case it was asked, so an answer keeps that case. Every answer belongs to
//! one index: the first use with another index empties the cache.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::index::DnsIndex;

/// How long an encoded answer stays the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Valid {
    /// Decided from the index: as long as the index.
    Index,
    /// Relayed from the cache of upstream answers: while that cache is at
    /// `generation` and until `until` (the answer's TTLs count down).
    Upstream {
        /// [`super::cache::AnswerCache::generation`] when it was read.
        generation: u64,
        /// When its TTLs count down another second, or it expires.
        until: Instant,
    },
}

/// One encoded answer and what the metrics count of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The response as sent, with the ID of the query that made it.
    pub bytes: Box<[u8]>,
    /// Its response code (numeric).
    pub rcode: u16,
    /// Whether it is truncated (TC).
    pub truncated: bool,
    /// How long it stays the answer.
    pub valid: Valid,
}

/// Encoded answers of one index, keyed by the query after its ID.
#[derive(Debug)]
pub struct EncodedAnswers {
    /// The index the answers were decided from. Weak: the cache must not
    /// keep an old index's names alive; while it is held, no other index can
    /// be allocated at the same address, so comparing addresses is exact.
    index: Weak<DnsIndex>,
    entries: HashMap<Box<[u8]>, Encoded>,
    capacity: usize,
    /// Bytes of keys and answers kept, and their bound: a query may carry
    /// up to 4 KiB of EDNS options, so a count of entries alone bounds
    /// nothing.
    bytes: usize,
    max_bytes: usize,
}

impl EncodedAnswers {
    /// A cache of at most `capacity` answers (0: none kept) holding at
    /// most `max_bytes` of queries and answers.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            index: Weak::new(),
            entries: HashMap::new(),
            capacity,
            bytes: 0,
            max_bytes,
        }
    }

    /// Answers kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Empties the cache when `index` is not the one its answers came from.
    fn follow(&mut self, index: &Arc<DnsIndex>) {
        if !std::ptr::eq(self.index.as_ptr(), Arc::as_ptr(index)) {
            self.clear();
            self.index = Arc::downgrade(index);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The answer to `query` (a whole message, ID first) from `index`,
    /// written into `out` with the query's ID; `upstream` is the cache of
    /// upstream answers' generation now, `now` the time.
    pub fn answer(
        &mut self,
        index: &Arc<DnsIndex>,
        query: &[u8],
        upstream: u64,
        now: impl FnOnce() -> Instant,
        out: &mut Vec<u8>,
    ) -> Option<&Encoded> {
        let (id, key) = split(query)?;
        self.follow(index);
        let hit = self.entries.get(key)?;
        if let Valid::Upstream { generation, until } = hit.valid
            && (generation != upstream || now() >= until)
        {
            return None;
        }
        out.clear();
        out.extend_from_slice(&hit.bytes);
        out[..2].copy_from_slice(id);
        Some(hit)
    }

    /// Keeps `answer`, the response to `query` from `index`.
    pub fn put(&mut self, index: &Arc<DnsIndex>, query: &[u8], answer: Encoded) {
        let Some((_, key)) = split(query) else {
            return;
        };
        let size = key.len() + answer.bytes.len();
        if self.capacity == 0 || answer.bytes.len() < 12 || size > self.max_bytes {
            return;
        }
        self.follow(index);
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= key.len() + old.bytes.len();
        }
        if self.entries.len() >= self.capacity || self.bytes + size > self.max_bytes {
            // Bounded, as the cache of upstream answers: start over.
            self.clear();
        }
        self.bytes += size;
        self.entries.insert(key.into(), answer);
    }
}

/// The ID and the rest of a message, when it has a whole header.
fn split(message: &[u8]) -> Option<(&[u8], &[u8])> {
    (message.len() >= 12).then(|| message.split_at(2))
}
