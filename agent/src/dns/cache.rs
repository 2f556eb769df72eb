//! A small cache of upstream answers, as NodeLocal DNSCache keeps one:
//! positive answers for at most 30 s, negative ones for at most 5 s, and
//! never longer than their own TTLs. Bounded: when full it starts over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, RData, Record, RecordType};

const MAX_POSITIVE: u32 = 30;
const MAX_NEGATIVE: u32 = 5;

#[derive(Debug, Hash, PartialEq, Eq)]
struct Key {
    name: LowerName,
    qtype: RecordType,
    qclass: DNSClass,
}

impl Key {
    fn of(q: &Query) -> Self {
        Self {
            name: LowerName::new(&q.name),
            qtype: q.query_type,
            qclass: q.query_class,
        }
    }
}

#[derive(Debug)]
struct Entry {
    answer: Message,
    stored: Instant,
    ttl: u32,
    /// The answer with TTLs counted down to `aged_at` seconds: shared by
    /// every hit within that second instead of copied for each.
    aged: Arc<Message>,
    aged_at: u32,
}

/// `answer` as it is `age` seconds after it was stored for `ttl` seconds.
fn count_down(answer: &Message, ttl: u32, age: u32) -> Message {
    let mut answer = answer.clone();
    for r in answer
        .answers
        .iter_mut()
        .chain(answer.authorities.iter_mut())
        .chain(answer.additionals.iter_mut())
    {
        r.ttl = r.ttl.min(ttl).saturating_sub(age);
    }
    answer
}

/// Upstream answers by question.
#[derive(Debug)]
pub struct AnswerCache {
    entries: Mutex<HashMap<Key, Entry>>,
    capacity: usize,
    /// Counts the changes of `entries` (an answer put, the cache emptied):
    /// what was encoded from an answer stays that answer while it is unchanged.
    generation: AtomicU64,
}

impl AnswerCache {
    /// A cache of at most `capacity` answers (0: no caching).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
            generation: AtomicU64::new(0),
        }
    }

    /// The cached answer to `query`, with TTLs counted down.
    pub fn get(&self, query: &Query, now: Instant) -> Option<Arc<Message>> {
        self.get_until(query, now).map(|(answer, _)| answer)
    }

    /// The cached answer to `query`, with TTLs counted down, and until when
    /// it stays this answer (its next second of age, or its expiry) unless
    /// [`Self::generation`] changes first.
    pub fn get_until(&self, query: &Query, now: Instant) -> Option<(Arc<Message>, Instant)> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.get_mut(&Key::of(query))?;
        let age =
            u32::try_from(now.saturating_duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        if age >= e.ttl {
            return None;
        }
        if age != e.aged_at {
            e.aged = Arc::new(count_down(&e.answer, e.ttl, age));
            e.aged_at = age;
        }
        let until = e.stored + Duration::from_secs(u64::from(age) + 1);
        Some((e.aged.clone(), until))
    }

    /// Changes so far: read it before [`Self::get_until`]; while it stays
    /// the same, no answer was put, replaced or dropped.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps `answer` to `query` if it is cacheable.
    pub fn put(&self, query: &Query, answer: &Message, now: Instant) {
        if self.capacity == 0 || answer.metadata.truncation {
            return;
        }
        let ttl = match answer.metadata.response_code {
            ResponseCode::NoError if !answer.answers.is_empty() => {
                min_ttl(&answer.answers).min(MAX_POSITIVE)
            }
            ResponseCode::NoError | ResponseCode::NXDomain => {
                negative_ttl(answer).min(MAX_NEGATIVE)
            }
            _ => return,
        };
        if ttl == 0 {
            return;
        }
        let key = Key::of(query);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Replacing an answer adds none: only a new question may start over
        // (with exactly `capacity` questions asked, a second answer to one of
        // them emptied the whole cache).
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, e| {
                now.saturating_duration_since(e.stored) < Duration::from_secs(u64::from(e.ttl))
            });
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        let entry = Entry {
            answer: answer.clone(),
            stored: now,
            ttl,
            aged: Arc::new(count_down(answer, ttl, 0)),
            aged_at: 0,
        };
        entries.insert(key, entry);
    }
}

fn min_ttl(records: &[Record]) -> u32 {
    records.iter().map(|r| r.ttl).min().unwrap_or(0)
}

/// RFC 2308: the SOA's TTL, capped by its minimum field.
fn negative_ttl(answer: &Message) -> u32 {
    answer
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })
        .unwrap_or(0)
}
