//! Stale UDP flows: after every sync (full syncs included), the conntrack
//! entries of UDP frontends that are not translated to an endpoint still
//! serving the frontend are deleted, through netlink.
//!
//! ```text
//!  state in force ─▶ endpoints::udp_frontends ─▶ Desired { frontend ─▶ serving endpoints }
//!  netlink dump of the family's conntrack table ─▶ UDP entries ─▶ stale(entries, desired) ─▶ netlink delete, per entry
//! ```
//!
//! A frontend is a cluster, external or LB IP and port, or a node port on
//! a node address (or translated); the dump and deletes use
//! `netlink-packet-netfilter` over `netlink-sys`, one request per entry.
//! `bench_conntrack` measures them against the `conntrack` processes they
//! replace (BENCHMARKS.md, "Stale UDP flows").
//!
//! Why: a UDP "connection" is a conntrack entry that lives as long as
//! datagrams keep coming, and it keeps the endpoint it was translated to.
//! When that endpoint goes, the flow blackholes until the entry is gone
//! (kubernetes#48370, #59368). The clean-up is kube-proxy's
//! (`pkg/proxy/conntrack/cleanup.go`): it compares what the kernel holds
//! with what is wanted now, so it works the same after a restart from disk
//! or a failed sync as after a change, and it judges by what is *gone*:
//! an entry stays while its endpoint still serves the frontend, whatever
//! policy or topology now select (a terminating or unhinted endpoint
//! keeps its flows, as TCP connections keep theirs). A frontend with no
//! serving endpoint left loses every flow (kubernetes#139628). Entries that were
//! never translated (sent while no rule existed) are cleared too, so the
//! flow meets the rules.
//!
//! One process per entry (`conntrack -D`) cost about 12 ms each; the
//! netlink dump and deletes run in this process, one socket per
//! reconciliation. In tests the socket is opened inside the test's
//! network namespace (a thread enters it with setns(2) just to create
//! the socket, which stays in that namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};

pub use crate::endpoints::Frontend;

/// Per UDP frontend, the endpoints (address and port) that serve it.
pub type Desired = BTreeMap<Frontend, BTreeSet<SocketAddr>>;

/// `CTA_ZONE`: entries in a conntrack zone are deleted with their zone.
const CTA_ZONE: u16 = 18;

/// A conntrack operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The network namespace could not be entered.
    #[error("entering network namespace {path}")]
    Namespace {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The netlink socket could not be opened, or talking over it failed.
    #[error("netlink {what}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered with something we cannot read.
    #[error("decoding the kernel's conntrack answer: {0}")]
    Decode(String),
    /// The kernel refused the request (a negative errno).
    #[error("the kernel refused the conntrack {what}: errno {errno}")]
    Kernel {
        /// What was asked.
        what: &'static str,
        /// The errno.
        errno: i32,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One UDP conntrack entry, as far as clean-up needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The original direction's source.
    pub source: SocketAddr,
    /// The original direction's destination: the frontend.
    pub destination: SocketAddr,
    /// The reply direction's source: the endpoint it was translated to
    /// (the destination itself when it was not translated).
    pub reply_source: SocketAddr,
    /// The conntrack zone, when not the default one.
    pub zone: Option<u16>,
}

/// The entries of `entries` that must go: those to a frontend of
/// `desired` whose reply does not come from an endpoint serving it. A
/// node-port frontend matches entries to that port on one of
/// `node_addresses` (or loopback), or translated by someone; an
/// untranslated flow through the node to another host's port is left alone.
pub fn stale<'e>(
    entries: &'e [Entry],
    desired: &Desired,
    node_addresses: &[IpAddr],
) -> Vec<&'e Entry> {
    entries
        .iter()
        .filter(|e| {
            if let Some(serving) = desired.get(&Frontend::Ip(e.destination)) {
                return !serving.contains(&e.reply_source);
            }
            let Some(serving) = desired.get(&Frontend::NodePort(e.destination.port())) else {
                return false;
            };
            let dst = e.destination.ip();
            let to_node = dst.is_loopback() || node_addresses.contains(&dst);
            let translated = e.reply_source != e.destination;
            (to_node || translated) && !serving.contains(&e.reply_source)
        })
        .collect()
}

/// The kernel's conntrack table of a network namespace, through netlink.
#[derive(Debug, Clone, Default)]
pub struct Conntrack {
    netns: Option<PathBuf>,
}

impl Conntrack {
    /// The table of the agent's own network namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// The table of the named network namespace (`ip netns` names).
    pub fn in_netns(name: &str) -> Self {
        Self {
            netns: Some(PathBuf::from("/var/run/netns").join(name)),
        }
    }

    fn socket(&self) -> Result<Socket> {
        let Some(path) = &self.netns else {
            return open_socket();
        };
        let ns = std::fs::File::open(path).map_err(|source| Error::Namespace {
            path: path.clone(),
            source,
        })?;
        // A thread of its own enters the namespace and ends right after, so
        // no other code ever runs there; the socket stays bound to it.
        std::thread::scope(|s| {
            s.spawn(|| {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| Error::Namespace {
                    path: path.clone(),
                    source: e.into(),
                })?;
                open_socket()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Netlink {
                    what: "socket thread",
                    source: std::io::Error::other("panicked"),
                })
            })
        })
    }

    /// Every UDP entry of the family (IPv4 or IPv6).
    pub fn udp_entries(&self, ipv6: bool) -> Result<Vec<Entry>> {
        let socket = self.socket()?;
        let request = message(
            ipv6,
            NLM_F_REQUEST | NLM_F_DUMP,
            ConntrackMessage::Get(Vec::new()),
        );
        send(&socket, request)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = socket
                .recv(&mut &mut buf[..], 0)
                .map_err(|source| Error::Netlink {
                    what: "receive",
                    source,
                })?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..n])
                    .map_err(|e| Error::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(Error::Kernel {
                            what: "dump",
                            errno: e.raw_code(),
                        });
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) =
                            m.inner
                            && let Some(e) = udp_entry(&attrs)
                        {
                            out.push(e);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    /// Deletes `entries`; entries already gone count as deleted. Returns
    /// how many the kernel removed.
    pub fn delete(&self, entries: &[&Entry]) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let socket = self.socket()?;
        let mut deleted = 0;
        let mut buf = vec![0u8; 1 << 13];
        for e in entries {
            let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(e.source.ip()),
                    IPTuple::DestinationAddress(e.destination.ip()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Udp),
                    ProtoTuple::SourcePort(e.source.port()),
                    ProtoTuple::DestinationPort(e.destination.port()),
                ]),
            ])];
            if let Some(zone) = e.zone {
                attrs.push(ConntrackAttribute::Other(DefaultNla::new(
                    CTA_ZONE,
                    zone.to_be_bytes().to_vec(),
                )));
            }
            let ipv6 = e.destination.is_ipv6();
            send(
                &socket,
                message(
                    ipv6,
                    NLM_F_REQUEST | NLM_F_ACK,
                    ConntrackMessage::Delete(attrs),
                ),
            )?;
            let n = socket
                .recv(&mut &mut buf[..], 0)
                .map_err(|source| Error::Netlink {
                    what: "receive",
                    source,
                })?;
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[..n])
                .map_err(|e| Error::Decode(e.to_string()))?;
            match msg.payload {
                NetlinkPayload::Error(err) => match err.code {
                    None => deleted += 1,
                    // ENOENT: the flow expired or was deleted meanwhile.
                    Some(c) if c.get() == -2 => {}
                    Some(_) => {
                        return Err(Error::Kernel {
                            what: "delete",
                            errno: err.raw_code(),
                        });
                    }
                },
                _ => deleted += 1,
            }
        }
        Ok(deleted)
    }

    /// Deletes the entries of `desired`'s frontends that are stale, in one
    /// family; returns how many went.
    pub fn reconcile(
        &self,
        ipv6: bool,
        desired: &Desired,
        node_addresses: &[IpAddr],
    ) -> Result<usize> {
        let entries = self.udp_entries(ipv6)?;
        let stale = stale(&entries, desired, node_addresses);
        self.delete(&stale)
    }

    /// [`Conntrack::reconcile`] after a sync, which logs what it did: a
    /// failure does not fail the sync (the rules are in force either way).
    pub fn reconcile_after_sync(&self, ipv6: bool, desired: &Desired, node_addresses: &[IpAddr]) {
        if desired.is_empty() {
            return;
        }
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        match self.reconcile(ipv6, desired, node_addresses) {
            Ok(0) => {}
            Ok(n) => tracing::info!(family, deleted = n, "cleared stale UDP flows"),
            Err(e) => tracing::warn!(family, "clearing stale UDP flows: {e}"),
        }
    }
}

fn open_socket() -> Result<Socket> {
    let fail = |what| move |source| Error::Netlink { what, source };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(fail("socket"))?;
    socket.bind_auto().map_err(fail("bind"))?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(fail("connect"))?;
    Ok(socket)
}

fn message(ipv6: bool, flags: u16, inner: ConntrackMessage) -> NetlinkMessage<NetfilterMessage> {
    let family = if ipv6 {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    };
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            inner,
        )),
    );
    msg.finalize();
    msg
}

fn send(socket: &Socket, msg: NetlinkMessage<NetfilterMessage>) -> Result<()> {
    let mut bytes = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut bytes);
    socket
        .send(&bytes, 0)
        .map(|_| ())
        .map_err(|source| Error::Netlink {
            what: "send",
            source,
        })
}

/// The addresses and ports of one direction's tuple, and its protocol.
fn tuple(t: &[Tuple]) -> Option<(SocketAddr, SocketAddr, bool)> {
    let (mut src, mut dst, mut sport, mut dport, mut udp) = (None, None, None, None, false);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(p) => {
                for x in p {
                    match x {
                        ProtoTuple::Protocol(p) => udp = *p == Protocol::Udp,
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        SocketAddr::new(src?, sport?),
        SocketAddr::new(dst?, dport?),
        udp,
    ))
}

fn udp_entry(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let (mut orig, mut reply, mut zone) = (None, None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            ConntrackAttribute::Other(nla) if netlink_packet_core::Nla::kind(nla) == CTA_ZONE => {
                let mut v = [0u8; 2];
                netlink_packet_core::Nla::emit_value(nla, &mut v);
                zone = Some(u16::from_be_bytes(v)).filter(|z| *z != 0);
            }
            _ => {}
        }
    }
    let (source, destination, udp) = orig?;
    let (reply_source, _, _) = reply?;
    udp.then_some(Entry {
        source,
        destination,
        reply_source,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn entry(dst: &str, reply: &str) -> Entry {
        Entry {
            source: sa("10.244.2.9:40400"),
            destination: sa(dst),
            reply_source: sa(reply),
            zone: None,
        }
    }

    fn desired() -> Desired {
        let mut d = Desired::new();
        d.insert(
            Frontend::Ip(sa("10.96.0.11:53")),
            [sa("10.244.1.2:5353")].into(),
        );
        d.insert(Frontend::NodePort(30053), [sa("10.244.1.2:5353")].into());
        d
    }

    #[test]
    fn only_flows_not_going_to_a_serving_endpoint_are_stale() {
        let node = ["10.99.0.11".parse().expect("ip")];
        let entries = vec![
            // To a serving endpoint: kept.
            entry("10.96.0.11:53", "10.244.1.2:5353"),
            // To an endpoint that is gone, or on a port it no longer serves.
            entry("10.96.0.11:53", "10.244.9.9:5353"),
            entry("10.96.0.11:53", "10.244.1.2:53"),
            // Never translated (sent before the rules existed).
            entry("10.96.0.11:53", "10.96.0.11:53"),
            // Another port of the same address, another address: not ours.
            entry("10.96.0.11:54", "10.244.9.9:5353"),
            entry("10.96.0.12:53", "10.244.9.9:5353"),
            // The node port: to the node, translated elsewhere or not at all.
            entry("10.99.0.11:30053", "10.244.9.9:5353"),
            entry("10.99.0.11:30053", "10.99.0.11:30053"),
            entry("10.99.0.11:30053", "10.244.1.2:5353"),
            // A flow through the node to another host's port 30053: left alone.
            entry("192.0.2.1:30053", "192.0.2.1:30053"),
        ];
        let gone: Vec<usize> = stale(&entries, &desired(), &node)
            .into_iter()
            .map(|e| entries.iter().position(|x| x == e).expect("one of them"))
            .collect();
        assert_eq!(gone, [1, 2, 3, 6, 7]);
    }

    #[test]
    fn dumped_attributes_are_read_as_entries() {
        let t = |src: &str, dst: &str| {
            let (s, d) = (sa(src), sa(dst));
            vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(s.ip()),
                    IPTuple::DestinationAddress(d.ip()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Udp),
                    ProtoTuple::SourcePort(s.port()),
                    ProtoTuple::DestinationPort(d.port()),
                ]),
            ]
        };
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(t("10.244.2.9:40400", "10.96.0.11:53")),
            ConntrackAttribute::CtaTupleReply(t("10.244.1.2:5353", "10.244.2.9:40400")),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 7])),
        ];
        assert_eq!(
            udp_entry(&attrs),
            Some(Entry {
                source: sa("10.244.2.9:40400"),
                destination: sa("10.96.0.11:53"),
                reply_source: sa("10.244.1.2:5353"),
                zone: Some(7),
            })
        );
        // TCP entries are not ours to clean.
        let mut tcp = attrs.clone();
        if let ConntrackAttribute::CtaTupleOrig(t) = &mut tcp[0]
            && let Tuple::Proto(p) = &mut t[1]
        {
            p[0] = ProtoTuple::Protocol(Protocol::Tcp);
        }
        assert_eq!(udp_entry(&tcp), None);
    }
}
