//! The request handler: one DNS message in, what to do with it out.
//!
//! [`handle`] is a pure function of the index, the access list and the
//! bytes received (no I/O, no clock), so it is unit-tested and fuzzed
//! directly; the server only moves bytes and forwards what it is told to.
//!
//! ```text
//!  bytes ─▶ <12 bytes or a response? ─▶ Drop
//!        ─▶ unparsable ─▶ FORMERR          source not allowed ─▶ REFUSED
//!        ─▶ cluster zone ─▶ SERVFAIL (no snapshot yet) | answer | NODATA+SOA | NXDOMAIN+SOA
//!        ─▶ known reverse name (PTR) ─▶ answer
//!        ─▶ anything else ─▶ Forward (to the upstreams)
//! ```

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

use super::acl::Acl;
use super::index::{DnsIndex, Lookup};

/// The UDP payload size we advertise and cap EDNS answers at (DNS flag day 2020).
pub const EDNS_PAYLOAD: u16 = 1232;
/// A UDP answer without EDNS is at most this long.
pub const CLASSIC_UDP_LIMIT: usize = 512;

/// How the query arrived; it decides the size limit of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers over the limit are truncated (TC) to make the client use TCP.
    Udp,
    /// Stream: up to 65,535 bytes.
    Tcp,
}

/// An answer ready to send.
#[derive(Debug)]
pub struct Reply {
    /// The encoded message.
    pub bytes: Vec<u8>,
    /// Its response code (for metrics).
    pub rcode: ResponseCode,
    /// Refused because of the source address.
    pub refused_source: bool,
    /// Truncated to fit a UDP datagram.
    pub truncated: bool,
}

/// A query for the upstreams.
#[derive(Debug)]
pub struct Forward {
    /// The parsed request.
    pub request: Message,
    /// The question to ask upstream.
    pub query: Query,
    /// A CNAME of ours (ExternalName) that the upstream answer follows.
    pub cname: Option<Record>,
    /// Size limit of the answer to the client.
    pub limit: usize,
}

/// What to do with a received message.
#[derive(Debug)]
pub enum Outcome {
    /// Send this.
    Reply(Reply),
    /// Ask the upstreams, then answer.
    Forward(Box<Forward>),
    /// Send nothing (too short to answer, or not a query at all).
    Drop,
}

/// Decides what to do with `bytes` received from `src`.
pub fn handle(
    index: &DnsIndex,
    acl: &Acl,
    bytes: &[u8],
    src: IpAddr,
    transport: Transport,
) -> Outcome {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let request = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return Outcome::Reply(formerr(bytes)),
    };
    let limit = size_limit(&request, transport);
    if !acl.allows(src) {
        let mut r = finish(response(&request, ResponseCode::Refused), limit);
        r.refused_source = true;
        return Outcome::Reply(r);
    }
    if request.metadata.op_code != OpCode::Query {
        return Outcome::Reply(finish(response(&request, ResponseCode::NotImp), limit));
    }
    if request.queries.len() != 1 {
        return Outcome::Reply(finish(response(&request, ResponseCode::FormErr), limit));
    }
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Outcome::Reply(finish(response(&request, ResponseCode::BADVERS), limit));
    }
    let query = request.queries[0].clone();
    let name = LowerName::new(&query.name);
    if index.in_zone(&name) {
        let resp = answer_zone(index, &request, &query, &name);
        if !matches!(query.query_type, RecordType::CNAME | RecordType::ANY)
            && let Some((cname, target)) = follow_outside(index, &resp)
        {
            let mut upstream = Query::query(target, query.query_type);
            upstream.query_class = query.query_class;
            return Outcome::Forward(Box::new(Forward {
                request,
                query: upstream,
                cname: Some(cname),
                limit,
            }));
        }
        return Outcome::Reply(finish(resp, limit));
    }
    if query.query_type == RecordType::PTR
        && query.query_class == DNSClass::IN
        && index.has_snapshot()
        && let Some(records) = index.ptr(&name)
    {
        let mut resp = response(&request, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        resp.answers = owned_by(records, &query.name);
        return Outcome::Reply(finish(resp, limit));
    }
    Outcome::Forward(Box::new(Forward {
        request,
        query,
        cname: None,
        limit,
    }))
}

/// The pure bytes-in, bytes-out form of [`handle`], for fuzzing: forwarded
/// queries give `None`.
pub fn handle_bytes(
    index: &DnsIndex,
    acl: &Acl,
    bytes: &[u8],
    src: IpAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    match handle(index, acl, bytes, src, transport) {
        Outcome::Reply(r) => Some(r.bytes),
        Outcome::Forward(_) | Outcome::Drop => None,
    }
}

fn answer_zone(index: &DnsIndex, request: &Message, query: &Query, name: &LowerName) -> Message {
    if !index.has_snapshot() {
        return response(request, ResponseCode::ServFail);
    }
    if query.query_class != DNSClass::IN && query.query_class != DNSClass::ANY {
        return response(request, ResponseCode::Refused);
    }
    if matches!(query.query_type, RecordType::AXFR | RecordType::IXFR) {
        return response(request, ResponseCode::Refused);
    }
    let mut resp = response(request, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    match index.lookup(name, query.query_type) {
        Lookup::Records(records, rtype) => {
            resp.answers = owned_by(records, &query.name);
            if rtype == RecordType::CNAME && query.query_type != RecordType::CNAME {
                follow_cname(index, &mut resp, query.query_type);
            }
            if rtype == RecordType::SRV {
                add_targets(index, &mut resp);
            }
        }
        Lookup::NoData => resp.authorities.push(index.soa().clone()),
        Lookup::NxDomain => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.authorities.push(index.soa().clone());
        }
    }
    resp
}

/// Answers a CNAME's target from the zone when it is ours; an outside
/// target is left to [`follow_outside`] through the upstreams.
fn follow_cname(index: &DnsIndex, resp: &mut Message, qtype: RecordType) {
    let Some(RData::CNAME(target)) = resp.answers.last().map(|r| &r.data) else {
        return;
    };
    let target = LowerName::new(&target.0);
    if !index.in_zone(&target) {
        return;
    }
    match index.lookup(&target, qtype) {
        Lookup::Records(records, rtype) if rtype == qtype => {
            resp.answers.extend(records.iter().cloned())
        }
        Lookup::NxDomain => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.authorities.push(index.soa().clone());
        }
        _ => resp.authorities.push(index.soa().clone()),
    }
}

/// The CNAME an answer ends on, when its target lies outside the zone.
pub(crate) fn follow_outside(index: &DnsIndex, resp: &Message) -> Option<(Record, Name)> {
    let last = resp.answers.last()?;
    let RData::CNAME(target) = &last.data else {
        return None;
    };
    (!index.in_zone(&LowerName::new(&target.0))).then(|| (last.clone(), target.0.clone()))
}

fn add_targets(index: &DnsIndex, resp: &mut Message) {
    let mut extra = Vec::new();
    for r in &resp.answers {
        if let RData::SRV(srv) = &r.data
            && let Some(node) = index.node(&LowerName::new(&srv.target))
        {
            extra.extend(
                node.records
                    .iter()
                    .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                    .cloned(),
            );
        }
    }
    resp.additionals = extra;
}

fn owned_by(records: &[Record], name: &Name) -> Vec<Record> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.name = name.clone();
            r
        })
        .collect()
}

/// A response to `request` with its question, flags and EDNS.
pub(crate) fn response(request: &Message, rcode: ResponseCode) -> Message {
    let mut resp = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    resp.metadata = Metadata::response_from_request(&request.metadata);
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = rcode;
    resp.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        resp.edns = Some(edns);
    }
    resp
}

/// The largest answer the client takes over `transport`.
pub(crate) fn size_limit(request: &Message, transport: Transport) -> usize {
    match (transport, &request.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => CLASSIC_UDP_LIMIT,
        (Transport::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
    }
}

/// Encodes `resp`, truncating it (TC, question only) when over `limit`.
pub(crate) fn finish(resp: Message, limit: usize) -> Reply {
    let rcode = resp.metadata.response_code;
    let (bytes, truncated) = match resp.to_vec() {
        Ok(b) if b.len() <= limit => (b, false),
        Ok(_) => (resp.truncate().to_vec().unwrap_or_default(), true),
        Err(_) => {
            let fail = Message::error_msg(
                resp.metadata.id,
                resp.metadata.op_code,
                ResponseCode::ServFail,
            );
            (fail.to_vec().unwrap_or_default(), false)
        }
    };
    Reply {
        bytes,
        rcode,
        refused_source: false,
        truncated,
    }
}

/// FORMERR for a message we cannot parse: its header, no sections.
fn formerr(bytes: &[u8]) -> Reply {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&bytes[..2]);
    // QR, the request's opcode and RD; RA; rcode FORMERR.
    out[2] = 0x80 | (bytes[2] & 0x79);
    out[3] = 0x80 | 0x01;
    Reply {
        bytes: out,
        rcode: ResponseCode::FormErr,
        refused_source: false,
        truncated: false,
    }
}
