//! Set and map elements straight to the kernel: nf_tables netlink
//! messages written here, sent in batches on a `NETLINK_NETFILTER` socket.
//! libnftables parses a text of ~2 KiB per element (a full sync of
//! 100,000 Services is 2.3 million elements: GiBs); an element here is
//! some 50 bytes of a message and nothing is kept once it is sent.
//!
//! ```text
//!  elements::Batch (set, key, data in nft syntax) ─▶ Encoder ─▶ BATCH_BEGIN
//!                                                              NEWSETELEM / DELSETELEM (table, set, [ELEM { KEY, DATA }, ...]) ...
//!                                                              BATCH_END   ─▶ ElementSocket::send ─▶ one transaction
//! ```
//!
//! Element encoding (the kernel's `nf_tables.h`, as nft itself writes
//! them): a key is the concatenation of its fields, each padded to 4 bytes
//! (one register) when there are several; addresses and ports in network
//! order, `inet_proto` one byte, a `numgen` slot a host-order `u32`; a
//! single-field key is its field unpadded (`inet_service`: 2 bytes). A
//! map's data (`daddr . th dport`) is written the same way. An interval
//! element of a concatenated set (`fw_allow`) carries its first and last
//! key (`NFTA_SET_ELEM_KEY` / `KEY_END`). The fixed skeleton (tables,
//! chains, rules, set declarations and the node's CIDR sets) stays on
//! libnftables text: it is small and the same on every sync.
//!
//! Two questions go through the same socket rather than libnftables,
//! whose listing commands (even `list tables`) fetch every element of
//! every set first (44 s for `nft list tables` beside a set of a million
//! elements, measured here): whether our table exists (`GETTABLE`), and
//! whether a chain's rules jump to a given chain (`GETRULE`, dumped for
//! that one chain).
//!
//! A batch is one transaction: the kernel applies all of it or none and
//! answers before `sendmsg` returns. Only the last message asks for an
//! acknowledgement; a refused message is answered with its error anyway
//! (`NETLINK_CAP_ACK` keeps those answers small), so the replies queued
//! once `send` returns say whether the batch went in.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use crate::dataplane::Family;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// `NFT_JUMP`, a verdict code (negative, in network order on the wire).
const NFT_JUMP: i32 = -3;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 9;
const NFTA_DATA_VALUE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// An attribute's length is 16 bits: a message's element list stays under it.
const MAX_ELEMENTS_BYTES: usize = 60_000;

/// Why an element could not be encoded or a batch went wrong.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// An element's key or data is not what its set holds.
    #[error("element {key:?} of set {set}: field {field:?} is not {want}")]
    Element {
        /// The set or map.
        set: String,
        /// The whole key (or data), nft syntax.
        key: String,
        /// The field that did not parse.
        field: String,
        /// What the set wanted there.
        want: &'static str,
    },
    /// The socket could not be opened, written or read.
    #[error("nf_tables netlink socket: {what}")]
    Socket {
        /// The call that failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a message; nothing of the batch was applied.
    #[error("the kernel refused {op} elements of set {set}: {source}")]
    Refused {
        /// `add` or `delete`.
        op: &'static str,
        /// The set.
        set: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The kernel neither acknowledged the batch nor said why.
    #[error("the kernel did not acknowledge the element batch ({0} messages)")]
    NoAck(usize),
}

type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// Whether a set's key ends with a balancing slot (a `numgen` value).
fn slotted(set: &str) -> bool {
    set.ends_with("_slots")
}

/// Whether a set's elements are intervals of a concatenation (first and
/// last key). The data plane sends these through libnftables text: the
/// encoding below (`KEY` and `KEY_END`) did not match what nft programs
/// for `fw_allow` in the packet tests, not yet found why.
pub fn ranged(set: &str) -> bool {
    set == "fw_allow"
}

fn proto_number(p: &str) -> Option<u8> {
    match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

fn push_addr(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn pad(out: &mut Vec<u8>, from: usize) {
    while !(out.len() - from).is_multiple_of(4) {
        out.push(0);
    }
}

/// The binary key (and, for `fw_allow`, last key) of an element written
/// in nft syntax (`10.96.0.10 . tcp . 80 . 3`), by what its set holds.
/// Appends to `key` and `key_end`.
fn encode_fields(
    set: &str,
    text: &str,
    slot_last: bool,
    key: &mut Vec<u8>,
    key_end: &mut Vec<u8>,
) -> Result<()> {
    let fields: Vec<&str> = text.split(" . ").collect();
    let several = fields.len() > 1;
    let bad = |field: &str, want| NetlinkError::Element {
        set: set.to_owned(),
        key: text.to_owned(),
        field: field.to_owned(),
        want,
    };
    for (i, f) in fields.iter().enumerate() {
        let (start, start_end) = (key.len(), key_end.len());
        let last = i + 1 == fields.len();
        if let Ok(ip) = f.parse::<IpAddr>() {
            push_addr(key, ip);
            push_addr(key_end, ip);
        } else if f.contains('/') {
            let net: IpNet = f.parse().map_err(|_| bad(f, "an address or a prefix"))?;
            push_addr(key, net.network());
            push_addr(key_end, net.broadcast());
        } else if let Some(p) = proto_number(f) {
            key.push(p);
            key_end.push(p);
        } else if slot_last && last {
            let n: u32 = f.parse().map_err(|_| bad(f, "a slot number"))?;
            key.extend_from_slice(&n.to_ne_bytes());
            key_end.extend_from_slice(&n.to_ne_bytes());
        } else {
            let port: u16 = f.parse().map_err(|_| bad(f, "a port"))?;
            key.extend_from_slice(&port.to_be_bytes());
            key_end.extend_from_slice(&port.to_be_bytes());
        }
        if several {
            pad(key, start);
            pad(key_end, start_end);
        }
    }
    Ok(())
}

/// What one batch does to one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add elements (an element already there with the same data is no error).
    Add,
    /// Delete elements.
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Delete => "delete",
        }
    }
}

/// Writes one batch (one transaction) of element messages.
#[derive(Debug)]
pub struct Encoder {
    buf: Vec<u8>,
    family: u8,
    table: String,
    /// (op, set) of every message after BATCH_BEGIN, in order: errors
    /// come back by sequence number.
    messages: Vec<(Op, String)>,
    /// Where the open message starts, and where its element list starts.
    open: Option<(usize, usize)>,
    open_key: Option<(Op, String)>,
    key: Vec<u8>,
    key_end: Vec<u8>,
    data: Vec<u8>,
    data_end: Vec<u8>,
    elements: usize,
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn align4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Opens a nested attribute; [`nest_end`] writes its length.
fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = u16::try_from(buf.len() - at).expect("nests stay under 64 KiB");
    put_u16(buf, at, len);
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("a short attribute");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    align4(buf);
}

fn attr_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    attr(buf, ty, &v);
}

/// Starts a message: header (length written at the end) and `nfgenmsg`.
fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    at
}

fn finish(buf: &mut [u8], at: usize) {
    let len = u32::try_from(buf.len() - at).expect("a message under 4 GiB");
    put_u32(buf, at, len);
}

impl Encoder {
    /// A batch for our table in `family`.
    pub fn new(family: Family, table: &str) -> Self {
        let mut buf = Vec::new();
        let at = header(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut buf, at);
        Self {
            buf,
            family: nfproto(family),
            table: table.to_owned(),
            messages: Vec::new(),
            open: None,
            open_key: None,
            key: Vec::new(),
            key_end: Vec::new(),
            data: Vec::new(),
            data_end: Vec::new(),
            elements: 0,
        }
    }

    /// The messages that follow are for our table in `family` (a batch may
    /// hold both families: still one transaction).
    pub fn set_family(&mut self, family: Family) {
        let f = nfproto(family);
        if f != self.family {
            self.close();
            self.family = f;
        }
    }

    /// Elements written so far.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no element was written.
    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }

    fn close(&mut self) {
        if let Some((msg, list)) = self.open.take() {
            nest_end(&mut self.buf, list);
            finish(&mut self.buf, msg);
        }
        self.open_key = None;
    }

    fn open(&mut self, op: Op, set: &str) {
        let (ty, flags) = match op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE),
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST),
        };
        self.messages.push((op, set.to_owned()));
        let seq = u32::try_from(self.messages.len()).expect("messages fit u32");
        let msg = header(
            &mut self.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            seq,
            self.family,
            0,
        );
        attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &self.table);
        attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_SET, set);
        let list = nest_start(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS);
        self.open = Some((msg, list));
        self.open_key = Some((op, set.to_owned()));
    }

    /// One element operation; `data` is empty for a set. Consecutive
    /// elements of one set and op share a message.
    pub fn push(&mut self, op: Op, set: &str, key: &str, data: &str) -> Result<()> {
        self.key.clear();
        self.key_end.clear();
        encode_fields(set, key, slotted(set), &mut self.key, &mut self.key_end)?;
        self.data.clear();
        self.data_end.clear();
        if op == Op::Add && !data.is_empty() {
            encode_fields(set, data, false, &mut self.data, &mut self.data_end)?;
        }
        let same = matches!(&self.open_key, Some((o, s)) if *o == op && s == set);
        let full = self
            .open
            .is_some_and(|(_, list)| self.buf.len() - list > MAX_ELEMENTS_BYTES);
        if !same || full {
            self.close();
            self.open(op, set);
        }
        let el = nest_start(&mut self.buf, NFTA_LIST_ELEM);
        let k = nest_start(&mut self.buf, NFTA_SET_ELEM_KEY);
        attr(&mut self.buf, NFTA_DATA_VALUE, &self.key);
        nest_end(&mut self.buf, k);
        if ranged(set) {
            let k = nest_start(&mut self.buf, NFTA_SET_ELEM_KEY_END);
            attr(&mut self.buf, NFTA_DATA_VALUE, &self.key_end);
            nest_end(&mut self.buf, k);
        }
        if !self.data.is_empty() {
            let d = nest_start(&mut self.buf, NFTA_SET_ELEM_DATA);
            attr(&mut self.buf, NFTA_DATA_VALUE, &self.data);
            nest_end(&mut self.buf, d);
        }
        nest_end(&mut self.buf, el);
        self.elements += 1;
        Ok(())
    }

    /// The batch, ready to send: the last message asks for an ACK.
    pub fn finish(mut self) -> Sealed {
        if let Some((msg, _)) = self.open {
            let flags_at = msg + 6;
            let flags = u16::from_ne_bytes([self.buf[flags_at], self.buf[flags_at + 1]]);
            put_u16(&mut self.buf, flags_at, flags | NLM_F_ACK);
        }
        self.close();
        let seq = u32::try_from(self.messages.len() + 1).expect("messages fit u32");
        let at = header(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut self.buf, at);
        Sealed {
            buf: self.buf,
            messages: self.messages,
        }
    }
}

/// A finished batch.
#[derive(Debug)]
pub struct Sealed {
    buf: Vec<u8>,
    messages: Vec<(Op, String)>,
}

impl Sealed {
    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// A `NETLINK_NETFILTER` socket for element batches, in the network
/// namespace of the thread that opened it.
#[derive(Debug)]
pub struct ElementSocket {
    socket: Socket,
    sndbuf: usize,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> NetlinkError {
    move |source| NetlinkError::Socket { what, source }
}

impl ElementSocket {
    /// Opens one in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("socket"))?;
        socket.bind_auto().map_err(io("bind"))?;
        socket.set_cap_ack(true).map_err(io("NETLINK_CAP_ACK"))?;
        // Room for the error answers of a refused batch.
        rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, 4 << 20)
            .map_err(|e| io("SO_RCVBUFFORCE")(e.into()))?;
        socket.set_non_blocking(true).map_err(io("O_NONBLOCK"))?;
        Ok(Self { socket, sndbuf: 0 })
    }

    /// Sends one batch and reads the kernel's answers: `Ok` when it went in.
    pub fn send(&mut self, batch: &Sealed) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let len = batch.buf.len();
        if len + 4096 > self.sndbuf {
            // netlink refuses a message larger than the send buffer.
            let want = (len + 65536).next_power_of_two();
            rustix::net::sockopt::set_socket_send_buffer_size_force(&self.socket, want)
                .map_err(|e| io("SO_SNDBUFFORCE")(e.into()))?;
            self.sndbuf = want;
        }
        self.socket.send(&batch.buf, 0).map_err(io("sendmsg"))?;
        // The kernel ran the batch inside sendmsg: its answers are queued.
        let mut acked = false;
        let mut refused = None;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut b = &mut buf[..];
            let n = match self.socket.recv(&mut b, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(io("recv")(e)),
            };
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
                if len < 16 || at + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 20 {
                    let errno =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                    if errno == 0 {
                        acked |= seq as usize == batch.messages.len();
                    } else if refused.is_none() {
                        let (op, set) = seq
                            .checked_sub(1)
                            .and_then(|i| batch.messages.get(i as usize))
                            .cloned()
                            .unwrap_or((Op::Add, "?".to_owned()));
                        refused = Some(NetlinkError::Refused {
                            op: op.name(),
                            set,
                            source: std::io::Error::from_raw_os_error(-errno),
                        });
                    }
                }
                at += (len + 3) & !3;
            }
        }
        match refused {
            Some(e) => Err(e),
            None if acked => Ok(()),
            None => Err(NetlinkError::NoAck(batch.messages.len())),
        }
    }
}

/// The attributes of a netlink message's payload (or of a nested
/// attribute's): (type without its flags, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((ty, payload))
    })
}

fn attribute(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attributes(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

/// Whether a rule (its attributes) holds `jump CHAIN`.
fn rule_jumps_to(rule: &[u8], chain: &str) -> bool {
    let Some(exprs) = attribute(rule, NFTA_RULE_EXPRESSIONS) else {
        return false;
    };
    attributes(exprs).any(|(_, expr)| {
        let verdict = (attribute(expr, NFTA_EXPR_NAME) == Some(b"immediate\0".as_slice()))
            .then(|| attribute(expr, NFTA_EXPR_DATA))
            .flatten()
            .and_then(|d| attribute(d, NFTA_IMMEDIATE_DATA))
            .and_then(|d| attribute(d, NFTA_DATA_VERDICT));
        verdict.is_some_and(|v| {
            let code = attribute(v, NFTA_VERDICT_CODE)
                .and_then(|c| <[u8; 4]>::try_from(c).ok())
                .map(i32::from_be_bytes);
            let target =
                attribute(v, NFTA_VERDICT_CHAIN).map(|c| c.strip_suffix(b"\0").unwrap_or(c));
            code == Some(NFT_JUMP) && target == Some(chain.as_bytes())
        })
    })
}

impl ElementSocket {
    /// Sends one request and collects the payloads (after `nfgenmsg`) of
    /// the answers of type `answer` until the end of the dump or the
    /// acknowledgement; an errno answer is `Err` (ENOENT: no such object).
    fn query(&mut self, request: &[u8], answer: u16) -> Result<Vec<Vec<u8>>, std::io::Error> {
        self.socket.send(request, 0)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut b = &mut buf[..];
            // The kernel answers a GET inside sendmsg and writes further
            // parts of a dump inside each recvmsg: nothing is left to wait for.
            let n = match self.socket.recv(&mut b, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(std::io::Error::other("the kernel's answer ended early"));
                }
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    break;
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if len >= 20 => {
                        let errno =
                            i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                        return match errno {
                            0 => Ok(out),
                            e => Err(std::io::Error::from_raw_os_error(-e)),
                        };
                    }
                    t if t == answer && len >= 20 => out.push(buf[at + 20..at + len].to_vec()),
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }

    /// Whether table `table` exists in `family`.
    pub fn table_exists(&mut self, family: Family, table: &str) -> Result<bool> {
        let req = request(
            NFT_MSG_GETTABLE,
            NLM_F_ACK,
            family,
            &[(NFTA_TABLE_NAME, table)],
        );
        match self.query(&req, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE) {
            Ok(tables) => Ok(!tables.is_empty()),
            Err(e) if e.raw_os_error() == Some(libc_enoent()) => Ok(false),
            Err(e) => Err(io("GETTABLE")(e)),
        }
    }

    /// Whether a rule of chain `chain` of `table` in `family` jumps to
    /// `target` (no when the table or the chain is not there).
    pub fn jumps_to(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        target: &str,
    ) -> Result<bool> {
        let req = request(
            NFT_MSG_GETRULE,
            NLM_F_DUMP,
            family,
            &[(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)],
        );
        match self.query(&req, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE) {
            Ok(rules) => Ok(rules.iter().any(|r| rule_jumps_to(r, target))),
            Err(e) if e.raw_os_error() == Some(libc_enoent()) => Ok(false),
            Err(e) => Err(io("GETRULE")(e)),
        }
    }
}

/// One nf_tables request (a GET, not in a batch) with string attributes.
fn request(msg: u16, flags: u16, family: Family, attrs: &[(u16, &str)]) -> Vec<u8> {
    let mut req = Vec::new();
    let at = header(
        &mut req,
        (NFNL_SUBSYS_NFTABLES << 8) | msg,
        NLM_F_REQUEST | flags,
        1,
        nfproto(family),
        0,
    );
    for (ty, value) in attrs {
        attr_str(&mut req, *ty, value);
    }
    finish(&mut req, at);
    req
}

/// `ENOENT`: the object asked for does not exist.
fn libc_enoent() -> i32 {
    rustix::io::Errno::NOENT.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(set: &str, text: &str) -> (Vec<u8>, Vec<u8>) {
        let (mut k, mut e) = (Vec::new(), Vec::new());
        encode_fields(set, text, slotted(set), &mut k, &mut e).expect("encodes");
        (k, e)
    }

    #[test]
    fn concatenations_pad_each_field_to_a_register() {
        let (k, _) = key("ip_main_slots", "10.96.0.10 . tcp . 80 . 3");
        let mut want = vec![10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0];
        want.extend_from_slice(&3u32.to_ne_bytes());
        assert_eq!(k, want);
        // Map data has no slot.
        let (mut d, mut e) = (Vec::new(), Vec::new());
        encode_fields("ip_main_slots", "10.244.1.2 . 8080", false, &mut d, &mut e)
            .expect("encodes");
        assert_eq!(d, vec![10, 244, 1, 2, 0x1f, 0x90, 0, 0]);
        // A single field is not padded.
        assert_eq!(key("health_checks", "32000").0, vec![0x7d, 0x00]);
        assert_eq!(key("allocated_ips", "fd00::1").0.len(), 16);
        // A prefix is its first and last address.
        let (k, e) = key("fw_allow", "203.0.113.1 . tcp . 80 . 10.0.0.0/8");
        assert_eq!(&k[12..], &[10, 0, 0, 0]);
        assert_eq!(&e[12..], &[10, 255, 255, 255]);
        assert_eq!(&k[..12], &e[..12]);
    }

    /// A rule's attributes as the kernel dumps it: one expression,
    /// `immediate` with a verdict.
    fn rule(expr_name: &str, code: i32, chain: &str) -> Vec<u8> {
        let mut b = Vec::new();
        attr_str(&mut b, NFTA_RULE_TABLE, "switchyard");
        attr_str(&mut b, NFTA_RULE_CHAIN, "nat_prerouting");
        let exprs = nest_start(&mut b, NFTA_RULE_EXPRESSIONS);
        let elem = nest_start(&mut b, NFTA_LIST_ELEM);
        attr_str(&mut b, NFTA_EXPR_NAME, expr_name);
        let data = nest_start(&mut b, NFTA_EXPR_DATA);
        attr(&mut b, 1, &0u32.to_be_bytes()); // NFTA_IMMEDIATE_DREG
        let imm = nest_start(&mut b, NFTA_IMMEDIATE_DATA);
        let verdict = nest_start(&mut b, NFTA_DATA_VERDICT);
        attr(&mut b, NFTA_VERDICT_CODE, &code.to_be_bytes());
        attr_str(&mut b, NFTA_VERDICT_CHAIN, chain);
        for at in [verdict, imm, data, elem, exprs] {
            nest_end(&mut b, at);
        }
        b
    }

    #[test]
    fn a_jump_is_read_from_a_dumped_rule() {
        assert!(rule_jumps_to(
            &rule("immediate", NFT_JUMP, "services"),
            "services"
        ));
        assert!(!rule_jumps_to(
            &rule("immediate", NFT_JUMP, "servicesx"),
            "services"
        ));
        // goto (-4) is not a jump; a lookup is no verdict at all.
        assert!(!rule_jumps_to(
            &rule("immediate", -4, "services"),
            "services"
        ));
        assert!(!rule_jumps_to(
            &rule("lookup", NFT_JUMP, "services"),
            "services"
        ));
        // No expressions, or a cut-short buffer: no jump, no panic.
        let mut b = Vec::new();
        attr_str(&mut b, NFTA_RULE_TABLE, "switchyard");
        assert!(!rule_jumps_to(&b, "services"));
        let whole = rule("immediate", NFT_JUMP, "services");
        for cut in 0..whole.len() {
            let _ = rule_jumps_to(&whole[..cut], "services");
        }
    }

    #[test]
    fn a_bad_field_names_set_key_and_field() {
        let mut enc = Encoder::new(Family::V4, "switchyard");
        let err = enc
            .push(Op::Add, "cluster_ips", "10.96.0.10 . tcp . http", "")
            .expect_err("not a port");
        assert_eq!(
            err.to_string(),
            "element \"10.96.0.10 . tcp . http\" of set cluster_ips: field \"http\" is not a port"
        );
    }

    #[test]
    fn a_batch_is_framed_and_only_its_last_message_asks_for_an_ack() {
        let mut enc = Encoder::new(Family::V4, "switchyard");
        enc.push(Op::Delete, "hairpin", "10.0.0.1 . 10.0.0.1", "")
            .expect("ok");
        enc.push(Op::Add, "hairpin", "10.0.0.2 . 10.0.0.2", "")
            .expect("ok");
        enc.push(Op::Add, "hairpin", "10.0.0.3 . 10.0.0.3", "")
            .expect("ok");
        assert_eq!(enc.elements(), 3);
        let sealed = enc.finish();
        let b = sealed.bytes();
        let mut at = 0;
        let mut seen = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().expect("4")) as usize;
            let ty = u16::from_ne_bytes([b[at + 4], b[at + 5]]);
            let flags = u16::from_ne_bytes([b[at + 6], b[at + 7]]);
            seen.push((ty, flags & NLM_F_ACK != 0));
            at += len;
        }
        assert_eq!(at, b.len(), "lengths add up");
        assert_eq!(
            seen,
            vec![
                (NFNL_MSG_BATCH_BEGIN, false),
                ((10 << 8) | NFT_MSG_DELSETELEM, false),
                ((10 << 8) | NFT_MSG_NEWSETELEM, true),
                (NFNL_MSG_BATCH_END, false),
            ]
        );
    }
}
