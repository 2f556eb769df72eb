//! Plain address questions answered straight from their bytes: one A or
//! AAAA question of IN class for a lower-case name, EDNS version 0 without
//! options or none, answered from one chunk of the index. The question is
//! read, looked up and the answer written here, without hickory-server's
//! parser and encoder, byte for byte what they give (the unit tests compare
//! the two on every name of a test zone, with and without EDNS and header
//! flags). Anything else is `false` and takes the general path.
//!
//! ```text
//!  datagram ─▶ encoded answer of this index? ─▶ send
//!          └▶ answer: plain A/AAAA question, records in one chunk, fits? ─▶ write ─▶ keep ─▶ send
//!          └▶ hickory-server parses ─▶ decide ─▶ hickory-server encodes ─▶ keep ─▶ send
//! ```
//!
//! Why: the encoded answers (`encoded.rs`) hold 16,384, and clients asking
//! more distinct names than that in turn (`bench_dns` at 100,000 Services
//! asks each name once a round) missed them on every query. Each miss then
//! paid hickory's `Request::from_bytes` and `MessageResponse` encoder, their
//! allocations, and the cache's insert and eviction: user-space CPU per query
//! rose several-fold at 100,000 Services against 2,000, where every query
//! was a repeat (perf; docs/benchmarks-history.md, "DNS hit path at 100,000
//! Services (target 6)").
//!
//! The written answer: the query's ID, QR, AA, RD and CD as asked, RA,
//! NOERROR; the question as asked (lower case only, so that the name is
//! looked up without lowering a copy of it); each record with its owner
//! (the first in full, the others a pointer to it, as hickory writes
//! them), TTL and address; and, when asked with EDNS, an OPT record with
//! our payload size ([`EDNS_PAYLOAD`] at most). An answer over the size limit
//! (512 bytes, or the EDNS payload size) is left to hickory's encoder, which
//! truncates it.

use hickory_proto::rr::{DNSClass, LowerName, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::handler::EDNS_PAYLOAD;
use super::index::{Data, DnsIndex, Lookup};

/// Bytes of a DNS header.
const HEADER: usize = 12;

/// Bytes of an OPT record without options.
const OPT: usize = 11;

/// Writes into `out` the answer to `query` (a whole message, ID first) from
/// `index` when it is a plain address question the index answers; `false`
/// when the general path must answer it (`out` is then unspecified).
pub(super) fn answer(index: &DnsIndex, query: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(plain) = Plain::read(query) else {
        return false;
    };
    if !index.has_snapshot() {
        return false;
    }
    let name_bytes = &query[HEADER..plain.question_end - 4];
    let Ok(name) = Name::read(&mut BinDecoder::new(name_bytes)) else {
        return false;
    };
    // Lower case already (`Plain::read`): no copy to lower it.
    let name = {
        let mut lower = LowerName::from(Name::root());
        *lower = name;
        lower
    };
    if !index.in_zone(&name) {
        return false;
    }
    let Lookup::Records(records, rtype) = index.lookup(&name, plain.qtype) else {
        return false;
    };
    let Some(records) = records.as_slice() else {
        return false;
    };
    if rtype != plain.qtype || records.is_empty() {
        return false;
    }
    let Ok(count) = u16::try_from(records.len()) else {
        return false;
    };
    let payload = plain.edns.map(|p| p.clamp(512, EDNS_PAYLOAD));
    out.clear();
    out.extend_from_slice(&query[..2]);
    // QR, opcode QUERY, AA, RD as asked; RA, CD as asked, NOERROR.
    out.push(0x80 | 0x04 | (query[2] & 0x01));
    out.push(0x80 | (query[3] & 0x10));
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(payload.is_some()).to_be_bytes());
    out.extend_from_slice(&query[HEADER..plain.question_end]);
    // hickory's encoder writes the first answer's owner in full (it keeps
    // no pointer to the question's name) and points the others at it.
    let first = plain.question_end as u16 | 0xc000;
    for (i, r) in records.iter().enumerate() {
        if i == 0 {
            out.extend_from_slice(name_bytes);
        } else {
            out.extend_from_slice(&first.to_be_bytes());
        }
        out.extend_from_slice(&u16::from(rtype).to_be_bytes());
        out.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
        out.extend_from_slice(&index.ttl().to_be_bytes());
        match r {
            Data::A(a) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&a.octets());
            }
            Data::Aaaa(a) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&a.octets());
            }
            _ => return false,
        }
    }
    if let Some(payload) = payload {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
    }
    out.len() <= usize::from(payload.unwrap_or(512))
}

/// What a plain question is, read from the message.
#[derive(Debug)]
struct Plain {
    qtype: RecordType,
    /// Where the question (name, type, class) ends.
    question_end: usize,
    /// The payload size of its EDNS, if it has EDNS.
    edns: Option<u16>,
}

impl Plain {
    /// `m` read as a plain question, when it is one: a standard query with
    /// one question and nothing else but an OPT record of version 0
    /// without options, a name in lower-case letters, digits, `-` and `_`
    /// without compression, A or AAAA, class IN.
    fn read(m: &[u8]) -> Option<Self> {
        let header = m.get(..HEADER)?;
        // QR (a query), opcode QUERY; AA, TC and RD are not looked at.
        if header[2] & 0xf8 != 0 {
            return None;
        }
        // Z and RCODE clear; RA, AD and CD are not looked at.
        if header[3] & 0x4f != 0 {
            return None;
        }
        let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
            return None;
        }
        let mut at = HEADER;
        loop {
            let len = usize::from(*m.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            // A pointer or an extended label type is not plain.
            if len > 63 {
                return None;
            }
            let label = m.get(at..at + len)?;
            let plain = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(b);
            if !label.iter().all(plain) {
                return None;
            }
            at += len;
            if at - HEADER > 255 {
                return None;
            }
        }
        let fixed = m.get(at..at + 4)?;
        let qtype = RecordType::from(u16::from_be_bytes([fixed[0], fixed[1]]));
        let class = DNSClass::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if !matches!(qtype, RecordType::A | RecordType::AAAA) || class != DNSClass::IN {
            return None;
        }
        let question_end = at + 4;
        let (edns, end) = if count(10) == 1 {
            let opt = m.get(question_end..question_end + OPT)?;
            // Root owner, type OPT, payload size, extended RCODE 0,
            // version 0, DO and Z clear, no options.
            if opt[..3] != [0, 0, 41] || opt[5..] != [0; 6] {
                return None;
            }
            let payload = u16::from_be_bytes([opt[3], opt[4]]);
            (Some(payload), question_end + OPT)
        } else {
            (None, question_end)
        };
        (end == m.len()).then_some(Self {
            qtype,
            question_end,
            edns,
        })
    }
}
