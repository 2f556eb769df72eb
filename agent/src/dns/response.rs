//! Responses built and sent through hickory-server, and the bytes-in,
//! bytes-out form of the stub for fuzzing and unit tests.
//!
//! ```text
//!  Answer / upstream Message ─▶ send(): header flags, EDNS, MessageResponseBuilder ─▶ ResponseHandler
//!  bytes ─▶ [handle_bytes: parse as hickory-server does] ─▶ decide ─▶ send() ─▶ Capture ─▶ bytes
//! ```
//!
//! hickory-server's encoder enforces the size limit: over UDP an answer
//! larger than the response's EDNS payload size (512 without EDNS) keeps
//! the records that fit and gets TC (RFC 2181 section 9 allows that). We
//! advertise the client's own size
//! capped at [`EDNS_PAYLOAD`], so that limit is the smaller of the two.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{
    MessageRequest, MessageResponse, MessageResponseBuilder, Queries,
};

use super::acl::Acl;
use super::handler::{Answer, Decision, EDNS_PAYLOAD, Forward, decide};
use super::index::DnsIndex;

/// How the query arrived; it decides the size limit of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers over the limit are truncated (TC) to make the client use TCP.
    Udp,
    /// Stream: up to 65,535 bytes.
    Tcp,
}

impl From<Transport> for Protocol {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        }
    }
}

/// Sends `answer` to `request`.
pub(crate) async fn answer<R: ResponseHandler>(
    request: &MessageRequest,
    answer: &Answer<'_>,
    handle: R,
) -> ResponseInfo {
    send(
        request,
        answer.rcode,
        answer.authoritative,
        answer.answers.iter().chain(answer.chased.iter()),
        answer.soa.into_iter(),
        answer.additionals.iter(),
        handle,
    )
    .await
}

/// Sends the upstream's `upstream` answer to `fwd`, after our CNAME if any.
pub(crate) async fn relay<R: ResponseHandler>(
    request: &MessageRequest,
    fwd: &Forward,
    upstream: &Message,
    handle: R,
) -> ResponseInfo {
    send(
        request,
        upstream.metadata.response_code,
        false,
        fwd.cname.iter().chain(&upstream.answers),
        upstream.authorities.iter(),
        upstream.additionals.iter(),
        handle,
    )
    .await
}

/// Sends an answer with no records.
pub(crate) async fn error<R: ResponseHandler>(
    request: &MessageRequest,
    rcode: ResponseCode,
    handle: R,
) -> ResponseInfo {
    send(
        request,
        rcode,
        false,
        std::iter::empty(),
        std::iter::empty(),
        std::iter::empty(),
        handle,
    )
    .await
}

/// What [`ResponseInfo`] to report for a request we did not answer, or
/// could not send an answer to.
pub(crate) fn unanswered(request: &MessageRequest, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

async fn send<'a, R: ResponseHandler>(
    request: &MessageRequest,
    rcode: ResponseCode,
    authoritative: bool,
    answers: impl Iterator<Item = &'a Record> + Send + 'a,
    authorities: impl Iterator<Item = &'a Record> + Send + 'a,
    additionals: impl Iterator<Item = &'a Record> + Send + 'a,
    mut handle: R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.recursion_available = true;
    metadata.authoritative = authoritative;
    metadata.response_code = rcode;
    let edns = request.edns.as_ref().map(|asked| {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload().clamp(512, EDNS_PAYLOAD));
        edns
    });
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        answers,
        authorities,
        std::iter::empty(),
        additionals,
    );
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("sending a DNS answer: {e}");
            unanswered(request, ResponseCode::ServFail)
        }
    }
}

/// A [`ResponseHandler`] that keeps the encoded response, encoding as
/// hickory-server's own `ResponseHandle` does.
#[derive(Clone)]
struct Capture {
    protocol: Protocol,
    out: Arc<Mutex<Vec<u8>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let limit = match self.protocol {
            Protocol::Udp => response.edns().map_or(512, Edns::max_payload),
            _ => u16::MAX,
        };
        let id = response.metadata().id;
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(_) => {
                // As hickory-server does: SERVFAIL, header only.
                bytes.clear();
                let mut metadata =
                    Metadata::new(id, MessageType::Response, hickory_proto::op::OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                let mut encoder = BinEncoder::new(&mut bytes);
                hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut encoder)?;
                ResponseInfo::from(header)
            }
        };
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
        Ok(info)
    }
}

impl Capture {
    fn new(transport: Transport) -> Self {
        Self {
            protocol: transport.into(),
            out: Arc::default(),
        }
    }
}

/// Runs `send` (one of this module's senders) with a [`Capture`], which
/// never waits; returns what it reported and the encoded response.
fn encode_now<F: Future<Output = ResponseInfo>>(
    transport: Transport,
    send: impl FnOnce(Capture) -> F,
) -> (ResponseInfo, Vec<u8>) {
    let capture = Capture::new(transport);
    let info = futures::executor::block_on(send(capture.clone()));
    (info, take(&capture).unwrap_or_default())
}

/// `answer` to `request`, encoded as it is sent over `transport`.
pub(crate) fn encode_answer(
    request: &MessageRequest,
    a: &Answer<'_>,
    transport: Transport,
) -> (ResponseInfo, Vec<u8>) {
    encode_now(transport, |c| answer(request, a, c))
}

/// An answer with no records and `rcode`, encoded as it is sent over `transport`.
pub(crate) fn encode_error(
    request: &MessageRequest,
    rcode: ResponseCode,
    transport: Transport,
) -> (ResponseInfo, Vec<u8>) {
    encode_now(transport, |c| error(request, rcode, c))
}

/// The `upstream` answer to `fwd`, encoded as it is sent over `transport`.
pub(crate) fn encode_relay(
    request: &MessageRequest,
    fwd: &Forward,
    upstream: &Message,
    transport: Transport,
) -> (ResponseInfo, Vec<u8>) {
    encode_now(transport, |c| relay(request, fwd, upstream, c))
}

/// FORMERR for `bytes`, a message with a header that does not parse, as
/// hickory-server answers it; `None` for fewer bytes than a header.
pub(crate) fn formerr(bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    formerr_for(&Header::read(&mut BinDecoder::new(bytes)).ok()?, transport)
}

fn formerr_for(header: &Header, transport: Transport) -> Option<Vec<u8>> {
    let empty = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
    let capture = Capture::new(transport);
    let response = MessageResponseBuilder::new(&empty, None)
        .error_msg(&header.metadata, ResponseCode::FormErr);
    futures::executor::block_on(capture.clone().send_response(response)).ok()?;
    take(&capture)
}

/// The stub as a function of bytes, for fuzzing and tests: what
/// hickory-server does before a request reaches a handler (nothing for
/// fewer than 12 bytes, FORMERR for what it cannot parse), then [`decide`],
/// then the response as it would be sent. Forwarded queries give `None`.
pub fn handle_bytes(
    index: &DnsIndex,
    acl: &Acl,
    bytes: &[u8],
    src: IpAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    Header::read(&mut BinDecoder::new(bytes)).ok()?;
    let Ok(request) =
        Request::from_bytes(bytes.to_vec(), SocketAddr::new(src, 53), transport.into())
    else {
        return formerr(bytes, transport);
    };
    match decide(index, acl, &request, src) {
        Decision::Answer(a) => Some(encode_answer(&request, &a, transport).1),
        Decision::Forward(_) | Decision::Drop => None,
    }
}

/// Answers one request received by our own UDP loop or TCP front through
/// `handler`, as hickory-server would: nothing for fewer than 12 bytes,
/// FORMERR for what does not parse. Returns the encoded response.
pub(super) async fn respond<H: hickory_server::server::RequestHandler>(
    handler: &H,
    bytes: Vec<u8>,
    src: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(&bytes)).ok()?;
    match Request::from_bytes(bytes, src, transport.into()) {
        Ok(request) => respond_parsed(handler, &request, transport).await,
        Err(_) => formerr_for(&header, transport),
    }
}

/// Answers a parsed `request` through `handler`; `None` when it sends nothing.
async fn respond_parsed<H: hickory_server::server::RequestHandler>(
    handler: &H,
    request: &Request,
    transport: Transport,
) -> Option<Vec<u8>> {
    let capture = Capture::new(transport);
    handler
        .handle_request::<_, hickory_server::net::runtime::TokioTime>(request, capture.clone())
        .await;
    take(&capture)
}

fn take(capture: &Capture) -> Option<Vec<u8>> {
    let bytes = std::mem::take(&mut *capture.out.lock().unwrap_or_else(|e| e.into_inner()));
    (!bytes.is_empty()).then_some(bytes)
}
