//! The core: what to answer to one parsed request.
//!
//! [`decide`] is a pure function of the index, the access list, the request
//! hickory-server parsed and its source (no I/O, no clock). It returns a
//! [`Decision`]: the records to answer with, a question for the
//! upstreams, or nothing. Building and sending the response is the adapter's job
//! (`response.rs`); so is anything hickory-server does before a request
//! reaches a handler (dropping messages shorter than a header or that are
//! responses, FORMERR for messages it cannot parse).
//!
//! ```text
//!  request ─▶ a response? ─▶ Drop            source not allowed ─▶ REFUSED
//!          ─▶ not QUERY ─▶ NOTIMP   ≠1 question ─▶ FORMERR   EDNS version > 0 ─▶ BADVERS
//!          ─▶ AXFR or IXFR ─▶ REFUSED
//!          ─▶ cluster zone ─▶ SERVFAIL (no snapshot yet) | answer | NODATA+SOA | NXDOMAIN+SOA
//!                             (ANY: one RRset of the name, RFC 8482)
//!                             (pod names: the address the name spells)
//!          ─▶ known reverse name (PTR) ─▶ answer
//!          ─▶ anything else ─▶ Forward (to the upstreams)
//! ```
//!
//! AXFR and IXFR are refused for any name: the stub has no zone to
//! transfer, and outside names were forwarded upstream. ANY answers one
//! RRset of the name (RFC 8482 section 4.1), not all of them. Reverse names
//! we do not know are forwarded (CoreDNS's `fallthrough` for reverse
//! zones). An `Answer` holds rcode, AA, the records made from the index's
//! data, owned by the name as asked (answers keep the case asked), and the
//! SOA by reference.
//! ExternalName targets outside the zone are resolved upstream and
//! returned after the CNAME.

use std::net::IpAddr;

use hickory_proto::op::{MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::zone_handler::MessageRequest;

use super::acl::Acl;
use super::index::{DnsIndex, Lookup};

/// The UDP payload size we advertise and cap EDNS answers at (DNS flag day 2020).
pub const EDNS_PAYLOAD: u16 = 1232;

/// An answer decided from the index; the adapter adds the question, the
/// header flags and EDNS.
#[derive(Debug, Default)]
pub struct Answer<'i> {
    /// Response code.
    pub rcode: ResponseCode,
    /// AA: the name is in the cluster zone or one of our reverse names.
    pub authoritative: bool,
    /// Refused because of the source address (for metrics).
    pub refused_source: bool,
    /// Answer section: the name's records, owned by the name as asked
    /// (answers keep the case asked).
    pub answers: Vec<Record>,
    /// Answer section, continued: the records of an in-zone CNAME target.
    pub chased: Vec<Record>,
    /// The zone's SOA in the authority section (negative answers).
    pub soa: Option<&'i Record>,
    /// Additional section (addresses of SRV targets).
    pub additionals: Vec<Record>,
}

impl Answer<'_> {
    /// An answer with no records.
    pub fn empty(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            ..Self::default()
        }
    }
}

/// A question for the upstreams.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The question to ask upstream.
    pub query: Query,
    /// A CNAME of ours (ExternalName) that the upstream answer follows.
    pub cname: Option<Record>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision<'i> {
    /// Answer with this.
    Answer(Answer<'i>),
    /// Ask the upstreams, then answer.
    Forward(Box<Forward>),
    /// Send nothing (not a query at all).
    Drop,
}

/// Decides what to answer to `request` from `src`.
pub fn decide<'i>(
    index: &'i DnsIndex,
    acl: &Acl,
    request: &MessageRequest,
    src: IpAddr,
) -> Decision<'i> {
    if request.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    if !acl.allows(src) {
        return Decision::Answer(Answer {
            refused_source: true,
            ..Answer::empty(ResponseCode::Refused)
        });
    }
    if request.metadata.op_code != OpCode::Query {
        return Decision::Answer(Answer::empty(ResponseCode::NotImp));
    }
    let [query] = request.queries.queries() else {
        return Decision::Answer(Answer::empty(ResponseCode::FormErr));
    };
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Decision::Answer(Answer::empty(ResponseCode::BADVERS));
    }
    let name = query.name();
    let asked = query.original();
    // A stub holds no zone to transfer, and an upstream's is not for a
    // pod to take: refused, whatever the name (forwarded before).
    if matches!(asked.query_type, RecordType::AXFR | RecordType::IXFR) {
        return Decision::Answer(Answer::empty(ResponseCode::Refused));
    }
    if index.in_zone(name) {
        let answer = answer_zone(index, asked, name);
        if !matches!(asked.query_type, RecordType::CNAME | RecordType::ANY)
            && let Some((cname, target)) = follow_outside(index, &answer)
        {
            let mut upstream = Query::query(target, asked.query_type);
            upstream.query_class = asked.query_class;
            return Decision::Forward(Box::new(Forward {
                query: upstream,
                cname: Some(cname),
            }));
        }
        return Decision::Answer(answer);
    }
    if asked.query_type == RecordType::PTR
        && asked.query_class == DNSClass::IN
        && index.has_snapshot()
        && let Some(records) = index.ptr(name)
    {
        return Decision::Answer(Answer {
            authoritative: true,
            answers: records.to_records(&asked.name, index.ttl()),
            ..Answer::empty(ResponseCode::NoError)
        });
    }
    Decision::Forward(Box::new(Forward {
        query: asked.clone(),
        cname: None,
    }))
}

fn answer_zone<'i>(index: &'i DnsIndex, query: &Query, name: &LowerName) -> Answer<'i> {
    if !index.has_snapshot() {
        return Answer::empty(ResponseCode::ServFail);
    }
    if query.query_class != DNSClass::IN && query.query_class != DNSClass::ANY {
        return Answer::empty(ResponseCode::Refused);
    }
    let mut answer = Answer {
        authoritative: true,
        ..Answer::empty(ResponseCode::NoError)
    };
    match index.lookup(name, query.query_type) {
        Lookup::Records(records, rtype) => {
            answer.answers = records.to_records(&query.name, index.ttl());
            if rtype == RecordType::CNAME && query.query_type != RecordType::CNAME {
                follow_cname(index, &mut answer, query.query_type);
            }
            if rtype == RecordType::SRV {
                add_targets(index, &mut answer);
            }
        }
        Lookup::Synthesized(mut record) => {
            record.name = query.name.clone();
            answer.answers = vec![*record];
        }
        Lookup::NoData => answer.soa = Some(index.soa_for(name)),
        Lookup::NxDomain => {
            answer.rcode = ResponseCode::NXDomain;
            answer.soa = Some(index.soa_for(name));
        }
    }
    answer
}

/// Answers a CNAME's target from the zone when it is ours; an outside
/// target is left to [`follow_outside`] through the upstreams.
fn follow_cname<'i>(index: &'i DnsIndex, answer: &mut Answer<'i>, qtype: RecordType) {
    let Some(RData::CNAME(target)) = answer.answers.last().map(|r| &r.data) else {
        return;
    };
    let target = LowerName::new(&target.0);
    if !index.in_zone(&target) {
        return;
    }
    match index.lookup(&target, qtype) {
        Lookup::Records(records, rtype) if rtype == qtype => {
            answer.chased = records.to_records(&Name::from(&target), index.ttl());
        }
        Lookup::Synthesized(record) if record.record_type() == qtype => {
            answer.answers.push(*record);
        }
        Lookup::NxDomain => {
            answer.rcode = ResponseCode::NXDomain;
            answer.soa = Some(index.soa_for(&target));
        }
        _ => answer.soa = Some(index.soa_for(&target)),
    }
}

/// The CNAME an answer ends on, when its target lies outside the zone.
fn follow_outside(index: &DnsIndex, answer: &Answer<'_>) -> Option<(Record, Name)> {
    let last = answer.answers.last()?;
    let RData::CNAME(target) = &last.data else {
        return None;
    };
    (!index.in_zone(&LowerName::new(&target.0))).then(|| (last.clone(), target.0.clone()))
}

fn add_targets(index: &DnsIndex, answer: &mut Answer<'_>) {
    let mut extra = Vec::new();
    for r in &answer.answers {
        if let RData::SRV(srv) = &r.data {
            let target = LowerName::new(&srv.target);
            if let Some(node) = index.node(&target) {
                let owner = Name::from(target);
                extra.extend(
                    node.records()
                        .iter()
                        .filter(|d| matches!(d.record_type(), RecordType::A | RecordType::AAAA))
                        .map(|d| d.record(&owner, index.ttl())),
                );
            }
        }
    }
    answer.additionals = extra;
}
