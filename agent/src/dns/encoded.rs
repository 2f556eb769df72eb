//! Encoded answers by query bytes. Over UDP, an answer from the index is a
//! function of the query's bytes after the two-byte ID, and of the index:
//! once hickory-server's encoder has made it, the next identical query gets
//! the same bytes with its own ID, without being parsed, decided or encoded
//! again. An answer relayed from the cache of upstream answers is the same
//! while its entry in that cache is (until the entry is replaced, dropped
//! or expires), except for its TTLs, which count down: the encoding keeps
//! where each relayed record's TTL is and what it was when the entry was
//! stored, and each copy sent has them counted down to the entry's age then
//! (unbound keeps absolute expiry times and rewrites TTLs the same way), so
//! it is byte for byte what encoding the aged answer would give.
//!
//! ```text
//!  datagram ─▶ answer(index, bytes) ─▶ hit: copy, the query's ID (and relayed TTLs) in ─▶ send
//!                                    └▶ miss: hickory-server parses, decide, encode ─▶ put ─▶ send
//! ```
//!
//! Kept: answers for a source the access list allows (a refused answer
//! depends on the source); nothing for a message that did not parse, nor an
//! answer that waited for an upstream. The key holds the question in the
//! case it was asked, so an answer keeps that case. Every answer belongs to
//! one index: the first use with another index empties the cache.

use std::sync::{Arc, Weak};
use std::time::Instant;

use hickory_proto::rr::RecordType;

use super::cache::{Cached, Current};
use super::clock::ClockMap;
use super::index::DnsIndex;

/// How long an encoded answer stays the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Valid {
    /// Decided from the index: as long as the index.
    Index,
    /// Relayed from the cache of upstream answers: while its entry there is
    /// current and unexpired, with its TTLs counted down.
    Upstream(Relayed),
}

/// What keeps an encoded relayed answer equal to the cache entry's. Held
/// in the entry itself, not behind a pointer: on this path each pointer
/// followed was a cache miss per query (perf, BENCHMARKS.md "DNS stub").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub(super) current: Current,
    /// [`super::cache::AnswerCache::retired`] when `current` was last seen
    /// set: while the count stays there, it is still set.
    seen: u64,
    pub(super) stored: Instant,
    /// Seconds after `stored` when it expires (the cache entry's TTL).
    pub(super) ttl: u32,
    ttls: TtlFields,
}

/// Where each relayed record's TTL is in the encoding, and its value at
/// age 0: inline for the few records most answers hold.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TtlFields {
    Few(u8, [(u16, u32); FEW_TTLS]),
    Many(Box<[(u16, u32)]>),
}

const FEW_TTLS: usize = 3;

impl TtlFields {
    fn new(fields: Vec<(u16, u32)>) -> Self {
        match u8::try_from(fields.len()) {
            Ok(n) if fields.len() <= FEW_TTLS => {
                let mut few = [(0, 0); FEW_TTLS];
                few[..fields.len()].copy_from_slice(&fields);
                Self::Few(n, few)
            }
            _ => Self::Many(fields.into()),
        }
    }

    fn as_slice(&self) -> &[(u16, u32)] {
        match self {
            Self::Few(n, few) => &few[..usize::from(*n)],
            Self::Many(many) => many,
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Self::Few(..) => 0,
            Self::Many(many) => size_of_val(&**many),
        }
    }
}

impl Relayed {
    /// How to keep `bytes`, encoded from `hit` with its first `ours`
    /// answers from the index (our CNAME, whose TTL does not count down),
    /// equal to what `hit`'s entry would encode to later; `None` when the
    /// encoding is not one we can walk.
    pub fn of(hit: &Cached, bytes: &[u8], ours: usize) -> Option<Self> {
        let ttls = ttl_fields(bytes, ours)?
            .into_iter()
            .map(|at| {
                let now = read_u32(bytes, at);
                // 0: it had counted down to 0 at `hit.age` or before, and
                // stays 0. Else it was `now + age` at age 0.
                let base = if now == 0 {
                    0
                } else {
                    now.saturating_add(hit.age)
                };
                Some((u16::try_from(at).ok()?, base))
            })
            .collect::<Option<_>>()?;
        Some(Self {
            current: hit.current.clone(),
            seen: hit.retired,
            stored: hit.stored,
            ttl: hit.ttl,
            ttls: TtlFields::new(ttls),
        })
    }
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

impl Encoded {
    /// Bytes it holds beyond its own size: the answer, and where its
    /// relayed TTLs are when there are many.
    fn footprint(&self) -> usize {
        self.bytes.len()
            + match &self.valid {
                Valid::Index => 0,
                Valid::Upstream(r) => r.ttls.heap_bytes(),
            }
    }
}

/// Encoded answers of one index, keyed by the query after its ID.
#[derive(Debug)]
pub struct EncodedAnswers {
    /// The index the answers were decided from. Weak: the cache must not
    /// keep an old index's names alive; while it is held, no other index can
    /// be allocated at the same address, so comparing addresses is exact.
    index: Weak<DnsIndex>,
    entries: ClockMap<Box<[u8]>, Encoded>,
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
            entries: ClockMap::default(),
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
    /// written into `out` with the query's ID (and, relayed, its TTLs as
    /// they are at `now`); `retired` is the cache of upstream answers'
    /// [`super::cache::AnswerCache::retired`], read before this call.
    pub fn answer(
        &mut self,
        index: &Arc<DnsIndex>,
        query: &[u8],
        retired: u64,
        now: impl FnOnce() -> Instant,
        out: &mut Vec<u8>,
    ) -> Option<&Encoded> {
        let (id, key) = split(query)?;
        self.follow(index);
        let hit = self.entries.get_mut(key)?;
        let age = match &mut hit.valid {
            Valid::Index => None,
            Valid::Upstream(r) => {
                if r.seen != retired {
                    // Entries were retired since: was this one?
                    if !r.current.holds() {
                        return None;
                    }
                    r.seen = retired;
                }
                let age = now().saturating_duration_since(r.stored).as_secs();
                let age = u32::try_from(age).unwrap_or(u32::MAX);
                if age >= r.ttl {
                    return None;
                }
                Some(age)
            }
        };
        out.clear();
        out.extend_from_slice(&hit.bytes);
        out[..2].copy_from_slice(id);
        if let (Some(age), Valid::Upstream(r)) = (age, &hit.valid) {
            for &(at, base) in r.ttls.as_slice() {
                let at = usize::from(at);
                out[at..at + 4].copy_from_slice(&base.saturating_sub(age).to_be_bytes());
            }
        }
        Some(hit)
    }

    /// Keeps `answer`, the response to `query` from `index`, if it fits
    /// beside what is kept: for an answer about as cheap to make again as to
    /// keep (`direct.rs`). Evicting for it cost a query more than making it:
    /// with more such names asked in turn than there are entries, each
    /// evicted the next one asked (perf, 100,000 Services).
    pub fn put_spare(&mut self, index: &Arc<DnsIndex>, query: &[u8], answer: Encoded) {
        self.follow(index);
        let size = query.len().saturating_sub(2) + answer.footprint();
        if self.entries.len() < self.capacity && self.bytes + size <= self.max_bytes {
            self.put(index, query, answer);
        }
    }

    /// Keeps `answer`, the response to `query` from `index`.
    pub fn put(&mut self, index: &Arc<DnsIndex>, query: &[u8], answer: Encoded) {
        let Some((_, key)) = split(query) else {
            return;
        };
        let size = key.len() + answer.footprint();
        if self.capacity == 0 || answer.bytes.len() < 12 || size > self.max_bytes {
            return;
        }
        self.follow(index);
        if let Some(old) = self.entries.insert(key.into(), answer) {
            self.bytes -= key.len() + old.footprint();
        }
        self.bytes += size;
        // Bounded as the cache of upstream answers is: one answer at a time
        // (`clock.rs`), never the one just kept (it fits alone).
        while self.entries.len() > self.capacity || self.bytes > self.max_bytes {
            let Some((k, old)) = self.entries.evict() else {
                break;
            };
            self.bytes -= k.len() + old.footprint();
        }
    }
}

/// Where the TTL of each record in the encoded message `m` is, but for the
/// first `skip` answers and the OPT pseudo-record (whose TTL field holds
/// EDNS flags); `None` when `m` is not a well-formed message.
fn ttl_fields(m: &[u8], skip: usize) -> Option<Vec<usize>> {
    let count = |at: usize| {
        Some(usize::from(u16::from_be_bytes([
            *m.get(at)?,
            *m.get(at + 1)?,
        ])))
    };
    let (questions, answers) = (count(4)?, count(6)?);
    let records = answers + count(8)? + count(10)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(m, at)? + 4;
    }
    let mut fields = Vec::with_capacity(records);
    for i in 0..records {
        at = skip_name(m, at)?;
        let rtype = count(at)?;
        let ttl = at + 4;
        let len = count(at + 8)?;
        at += 10 + len;
        if at > m.len() {
            return None;
        }
        if i >= skip.min(answers) && rtype != usize::from(u16::from(RecordType::OPT)) {
            fields.push(ttl);
        }
    }
    (at == m.len()).then_some(fields)
}

/// Where the name at `at` in `m` ends.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        match len & 0xc0 {
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(len),
            // A compression pointer ends the name.
            0xc0 => return (at + 2 <= m.len()).then_some(at + 2),
            _ => return None,
        }
    }
}

fn read_u32(m: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]])
}

/// The ID and the rest of a message, when it has a whole header.
fn split(message: &[u8]) -> Option<(&[u8], &[u8])> {
    (message.len() >= 12).then(|| message.split_at(2))
}
