//! A small cache of upstream answers, as NodeLocal DNSCache keeps one:
//! positive answers for at most 30 s, negative ones for at most 5 s, and
//! never longer than their own TTLs. Bounded: when full, each new question
//! evicts one entry, the next under the hand of `clock.rs` (first in,
//! first out, but for entries used since the hand last passed them); an
//! expired entry is dropped when it is looked up.
//!
//! Each entry carries a [`Current`] flag, cleared when the entry is
//! replaced or dropped: what the UDP loop encoded from an entry
//! (`encoded.rs`) holds the flag and is sent while it is set, so a name
//! fetched again from the upstream invalidates its own encoded answer and
//! no other. The cache also counts the entries it retired
//! ([`AnswerCache::retired`]): while that count is unchanged, no flag
//! needs reading (each one is a pointer away, a cache miss per query).
//!
//! Serve-stale (`--dns-serve-stale`, CoreDNS's `serve_stale` in its
//! `verify` mode, RFC 8767): an expired answer is kept that much longer,
//! never answered while fresh ones can be had, and handed out
//! ([`AnswerCache::stale`], with TTL [`STALE_TTL`]) only when every
//! upstream failed to answer the question.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, RData, Record, RecordType};

use super::clock::ClockMap;

const MAX_POSITIVE: u32 = 30;
const MAX_NEGATIVE: u32 = 5;

/// The TTL of a stale answer: RFC 8767's recommendation.
pub const STALE_TTL: u32 = 30;

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
    current: Current,
}

/// Whether one cache entry is still in the cache: set when it is put,
/// cleared for good when it is replaced, evicted or found expired. It also
/// remembers whether the entry was fetched again ahead of its expiry.
#[derive(Debug, Clone)]
pub struct Current(Arc<Flags>);

#[derive(Debug)]
struct Flags {
    holds: AtomicBool,
    prefetched: AtomicBool,
}

impl Current {
    fn new() -> Self {
        Self(Arc::new(Flags {
            holds: AtomicBool::new(true),
            prefetched: AtomicBool::new(false),
        }))
    }

    /// Whether the entry is still the cache's answer to its question.
    pub fn holds(&self) -> bool {
        self.0.holds.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.0.holds.store(false, Ordering::Release);
    }

    /// Prefetch, as CoreDNS's `prefetch` (with its default 10%): whether an
    /// answer stored at `stored` for `ttl` seconds, asked for again at
    /// `now`, is within the last tenth of its life (at least its last
    /// second) and has not been fetched again yet; true once per entry.
    pub fn prefetch_due(&self, stored: Instant, ttl: u32, now: Instant) -> bool {
        let age = now.saturating_duration_since(stored).as_secs();
        let margin = u64::from((ttl / 10).max(1));
        age + margin >= u64::from(ttl)
            && age < u64::from(ttl)
            && !self.0.prefetched.swap(true, Ordering::AcqRel)
    }
}

impl PartialEq for Current {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Current {}

/// A cache hit: the answer as it is now, and what an encoding of it needs
/// to stay exact (see `encoded.rs`).
#[derive(Debug, Clone)]
pub struct Cached {
    /// The answer with its TTLs counted down to `age`.
    pub answer: Arc<Message>,
    /// Whole seconds since it was stored.
    pub age: u32,
    /// When it was stored: `age` counts from here.
    pub stored: Instant,
    /// Seconds after `stored` when it expires.
    pub ttl: u32,
    /// Cleared when the entry is replaced or dropped.
    pub current: Current,
    /// [`AnswerCache::retired`] when it was looked up.
    pub retired: u64,
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
    entries: Mutex<ClockMap<Key, Entry>>,
    capacity: usize,
    /// How long an expired answer is kept for [`AnswerCache::stale`].
    stale_for: u32,
    /// Entries retired so far (their [`Current`] cleared), counted after
    /// they are cleared, under the lock.
    retired: AtomicU64,
}

impl AnswerCache {
    /// A cache of at most `capacity` answers (0: no caching).
    pub fn new(capacity: usize) -> Self {
        Self::serving_stale(capacity, std::time::Duration::ZERO)
    }

    /// A cache that keeps expired answers for `stale_for` more, for when
    /// the upstreams fail ([`AnswerCache::stale`]).
    pub fn serving_stale(capacity: usize, stale_for: std::time::Duration) -> Self {
        Self {
            entries: Mutex::default(),
            capacity,
            stale_for: u32::try_from(stale_for.as_secs()).unwrap_or(u32::MAX),
            retired: AtomicU64::new(0),
        }
    }

    /// The answer to `query` that expired less than the stale window ago,
    /// with every TTL [`STALE_TTL`]: for when no upstream answered.
    pub fn stale(&self, query: &Query, now: Instant) -> Option<Message> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.get_mut(&Key::of(query))?;
        let age =
            u32::try_from(now.saturating_duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        if age < e.ttl || age >= e.ttl.saturating_add(self.stale_for) {
            return None;
        }
        let mut answer = e.answer.clone();
        for r in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            r.ttl = STALE_TTL;
        }
        Some(answer)
    }

    /// The cached answer to `query`, with TTLs counted down.
    pub fn get(&self, query: &Query, now: Instant) -> Option<Arc<Message>> {
        self.lookup(query, now).map(|hit| hit.answer)
    }

    /// The cached answer to `query` at `now`, with TTLs counted down, and
    /// what makes an encoding of it follow the entry: its age, when it was
    /// stored and expires, and its [`Current`] flag.
    pub fn lookup(&self, query: &Query, now: Instant) -> Option<Cached> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = Key::of(query);
        let e = entries.get_mut(&key)?;
        let age =
            u32::try_from(now.saturating_duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        if age >= e.ttl {
            if age < e.ttl.saturating_add(self.stale_for) {
                // Kept for when the upstreams fail; answered no more.
                if e.current.holds() {
                    e.current.retire();
                    self.retired.fetch_add(1, Ordering::AcqRel);
                }
                return None;
            }
            // Expired: its room goes to the next question.
            if let Some(gone) = entries.remove(&key)
                && gone.current.holds()
            {
                gone.current.retire();
                self.retired.fetch_add(1, Ordering::AcqRel);
            }
            return None;
        }
        if age != e.aged_at {
            e.aged = Arc::new(count_down(&e.answer, e.ttl, age));
            e.aged_at = age;
        }
        Some(Cached {
            answer: e.aged.clone(),
            age,
            stored: e.stored,
            ttl: e.ttl,
            current: e.current.clone(),
            retired: self.retired.load(Ordering::Acquire),
        })
    }

    /// Entries retired (replaced, evicted, found expired) so far. Read it before
    /// a [`Current`]: if the flag is still set, it stays set at least until
    /// this count moves on.
    pub fn retired(&self) -> u64 {
        self.retired.load(Ordering::Acquire)
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
        let entry = Entry {
            answer: answer.clone(),
            stored: now,
            ttl,
            aged: Arc::new(count_down(answer, ttl, 0)),
            aged_at: 0,
            current: Current::new(),
        };
        let mut retired = 0;
        // Replacing an answer adds none: only a new question evicts.
        if let Some(old) = entries.insert(key, entry) {
            retired += u64::from(old.current.holds());
            old.current.retire();
        } else if entries.len() > self.capacity
            && let Some((_, e)) = entries.evict()
        {
            retired += u64::from(e.current.holds());
            e.current.retire();
        }
        if retired > 0 {
            self.retired.fetch_add(retired, Ordering::AcqRel);
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::A;

    use super::*;

    fn question(i: usize) -> Query {
        Query::query(
            Name::from_ascii(format!("n{i}.example.org.")).expect("name"),
            RecordType::A,
        )
    }

    fn answer(q: &Query) -> Message {
        let mut m = Message::query();
        m.add_query(q.clone());
        m.answers.push(Record::from_rdata(
            q.name.clone(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m
    }

    fn holds(cache: &AnswerCache, i: usize) -> bool {
        let entries = cache.entries.lock().expect("lock");
        entries.contains_key(&Key::of(&question(i)))
    }

    #[test]
    fn a_new_question_in_a_full_cache_evicts_one_answer_the_oldest_first() {
        let cache = AnswerCache::new(100);
        let t0 = Instant::now();
        for i in 0..100 {
            cache.put(&question(i), &answer(&question(i)), t0);
        }
        let n0 = cache.lookup(&question(0), t0).expect("cached");
        let retired = cache.retired();
        // An answer again to a question it holds evicts nothing else.
        cache.put(&question(7), &answer(&question(7)), t0);
        assert_eq!(cache.retired(), retired + 1, "only the old answer to n7");
        for i in 100..200 {
            cache.put(&question(i), &answer(&question(i)), t0);
            assert_eq!(cache.retired(), retired + 1 + (i as u64 - 99), "n{i}");
            assert_eq!(cache.entries.lock().expect("lock").len(), 100);
            if i == 198 {
                assert!(holds(&cache, 0), "n0, used, was passed over once");
            }
        }
        assert!(!n0.current.holds(), "then evicted");
        let kept: Vec<usize> = (0..200).filter(|&i| holds(&cache, i)).collect();
        assert_eq!(kept, (100..200).collect::<Vec<_>>(), "the new names, all");
    }

    #[test]
    fn an_expired_answer_is_kept_for_the_stale_window_and_only_handed_out_as_stale() {
        let cache = AnswerCache::serving_stale(10, Duration::from_secs(3600));
        let t0 = Instant::now();
        let q = question(1);
        cache.put(&q, &answer(&q), t0);
        let hit = cache.lookup(&q, t0).expect("cached");
        assert!(cache.stale(&q, t0).is_none(), "fresh: no stale answer");
        let expired = t0 + Duration::from_secs(30);
        assert!(cache.lookup(&q, expired).is_none(), "not served as fresh");
        assert!(!hit.current.holds(), "its encodings retire");
        assert_eq!(cache.retired(), hit.retired + 1);
        let stale = cache.stale(&q, expired).expect("stale");
        assert_eq!(stale.answers[0].ttl, STALE_TTL);
        assert!(cache.lookup(&q, expired).is_none());
        assert_eq!(cache.retired(), hit.retired + 1, "retired once");
        let too_old = t0 + Duration::from_secs(30 + 3600);
        assert!(cache.stale(&q, too_old).is_none(), "past the window");
        assert!(cache.lookup(&q, too_old).is_none());
        assert!(
            cache.entries.lock().expect("lock").is_empty(),
            "then dropped"
        );
        // A fresh answer replaces it.
        cache.put(&q, &answer(&q), expired);
        assert!(cache.lookup(&q, expired).is_some());
    }

    #[test]
    fn a_prefetch_is_due_once_in_the_last_tenth_of_an_answers_life() {
        let cache = AnswerCache::new(10);
        let t0 = Instant::now();
        let q = question(1);
        cache.put(&q, &answer(&q), t0);
        let hit = cache.lookup(&q, t0).expect("cached");
        assert_eq!(hit.ttl, 30);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!hit.current.prefetch_due(hit.stored, hit.ttl, at(26)));
        assert!(hit.current.prefetch_due(hit.stored, hit.ttl, at(27)));
        assert!(
            !hit.current.prefetch_due(hit.stored, hit.ttl, at(28)),
            "once"
        );
        let short = Current::new();
        assert!(!short.prefetch_due(t0, 5, at(3)));
        assert!(short.prefetch_due(t0, 5, at(4)), "at least the last second");
        assert!(!Current::new().prefetch_due(t0, 5, at(5)), "expired");
    }

    #[test]
    fn an_expired_answer_looked_up_is_dropped() {
        let cache = AnswerCache::new(10);
        let t0 = Instant::now();
        let q = question(1);
        cache.put(&q, &answer(&q), t0);
        let hit = cache.lookup(&q, t0).expect("cached");
        assert!(cache.lookup(&q, t0 + Duration::from_secs(30)).is_none());
        assert!(!hit.current.holds(), "retired when found expired");
        assert_eq!(cache.retired(), hit.retired + 1);
        assert!(cache.entries.lock().expect("lock").is_empty());
    }
}
