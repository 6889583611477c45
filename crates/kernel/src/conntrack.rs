//! Cutting live flows: deleting the conntrack entries of connections from a sandbox to
//! destinations it may no longer reach, and, at its teardown, of every flow of a sandbox
//! (`Conntrack::delete_involving`), over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `NFNL_SUBSYS_CTNETLINK`).
//!
//! The sandbox's `egress` chain accepts `ct state established,related` before it looks at the
//! sets, so an established flow outlives the set element that let it start. Revoking an
//! element therefore deletes the flow's conntrack entry too. The next packet of the flow then
//! finds no entry: conntrack's loose TCP tracking (`nf_conntrack_tcp_loose`, on by default)
//! may pick a mid-stream segment up, but as a *new* flow (ct state new; invalid with loose
//! tracking off), which the set check no longer accepts, so it is dropped and the unconfirmed
//! entry vanishes with it. Packets from the far side find no entry either and are dropped by
//! `forward` (only `established,related` reaches the sandbox). The sandbox's end is not reset:
//! it sees silence and times out on its own. The far end, when its packets reach a host that
//! masquerades the sandbox, finds no NAT binding left and gets a RST from the host's own stack
//! (tested in `crates/kernel/tests/revoke.rs`).
//!
//! The socket is opened in the calling thread's network namespace (the sandbox's host side).

use std::collections::HashSet;
use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    Nla as _,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::nft::sets::{ACK_TIMEOUT, ElementKey, ProtocolNumber as _, set_recv_timeout};
use crate::{Error, Result};

/// Attribute numbers the crate has no variant for: both identify the entry exactly.
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
/// Deletions sent before reading their acknowledgements (bounded by the socket buffer).
const DELETES_IN_FLIGHT: usize = 64;

/// The original direction of one tracked flow, as dumped, and the source of its reply
/// direction (where a DNAT sent it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    dport: Option<u16>,
    reply_src: Option<IpAddr>,
}

/// The destinations whose flows are cut: whole addresses, and (address, protocol, port).
#[derive(Debug, Default)]
struct Targets {
    sources: HashSet<IpAddr>,
    addrs: HashSet<IpAddr>,
    ports: HashSet<(IpAddr, u8, u16)>,
    /// Flows still allowed (address-port keys added by a narrowing swap): never cut.
    spare: HashSet<(IpAddr, u8, u16)>,
    /// Every destination off the namespace (`delete_outgoing`): neither loopback nor `local`.
    every_off: Option<HashSet<IpAddr>>,
    /// Every flow from these addresses (`delete_involving`), and with `inbound` every flow
    /// to them too (their reply source).
    involving: Option<HashSet<IpAddr>>,
    inbound: bool,
}

impl Targets {
    fn new(sources: &[IpAddr], dests: &[ElementKey], spare: &[ElementKey]) -> Self {
        let mut t = Targets {
            sources: sources.iter().copied().collect(),
            ..Targets::default()
        };
        for d in dests {
            match d {
                ElementKey::Addr(a) => {
                    t.addrs.insert(*a);
                }
                ElementKey::AddrPort(a, proto, port) => {
                    t.ports.insert((*a, proto.number(), *port));
                }
            }
        }
        for k in spare {
            if let ElementKey::AddrPort(a, proto, port) = k {
                t.spare.insert((*a, proto.number(), *port));
            }
        }
        t
    }

    fn matches(&self, f: &Flow) -> bool {
        if let Some(gone) = &self.involving {
            return gone.contains(&f.src)
                || (self.inbound && f.reply_src.is_some_and(|a| gone.contains(&a)));
        }
        if let Some(local) = &self.every_off {
            return !f.dst.is_loopback() && !local.contains(&f.dst);
        }
        let port = |p| (f.dst, f.proto, p);
        (self.sources.is_empty() || self.sources.contains(&f.src))
            && !f.dport.is_some_and(|p| self.spare.contains(&port(p)))
            && (self.addrs.contains(&f.dst)
                || f.dport
                    .is_some_and(|p| self.ports.contains(&(f.dst, f.proto, p))))
    }

    fn has_family(&self, v4: bool) -> bool {
        if let Some(gone) = &self.involving {
            return gone.iter().any(|a| a.is_ipv4() == v4);
        }
        if self.every_off.is_some() {
            return true;
        }
        (self.sources.is_empty() || self.sources.iter().any(|a| a.is_ipv4() == v4))
            && (self.addrs.iter().any(|a| a.is_ipv4() == v4)
                || self.ports.iter().any(|(a, ..)| a.is_ipv4() == v4))
    }
}

/// The source address of a tuple.
fn source_of(tuples: &[Tuple]) -> Option<IpAddr> {
    tuples.iter().find_map(|t| match t {
        Tuple::Ip(ips) => ips.iter().find_map(|ip| match ip {
            IPTuple::SourceAddress(a) => Some(*a),
            _ => None,
        }),
        _ => None,
    })
}

/// The original tuple of a dumped entry, if complete (without its reply source).
fn flow_of(tuples: &[Tuple]) -> Option<Flow> {
    let (mut src, mut dst, mut proto, mut dport) = (None, None, None, None);
    for t in tuples {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Flow {
        src: src?,
        dst: dst?,
        proto: proto?,
        dport,
        reply_src: None,
    })
}

fn message(
    family: NetfilterProtoFamily,
    msg: ConntrackMessage,
    flags: u16,
) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(family, 0, 0),
        msg,
    ));
    m.header.flags = flags;
    m
}

/// A ctnetlink socket of the calling thread's network namespace.
#[derive(Debug)]
struct Ctnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Ctnetlink {
    fn open() -> Result<Self> {
        let what = "open netlink socket for conntrack";
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| Error::io(what, e))?;
        socket.bind_auto().map_err(|e| Error::io(what, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io(what, e))?;
        set_recv_timeout(&socket, ACK_TIMEOUT).map_err(|e| Error::io(what, e))?;
        Ok(Ctnetlink {
            socket,
            seq: 1,
            buf: vec![0; 1 << 16],
        })
    }

    fn send(&mut self, msgs: &mut [NetlinkMessage<NetfilterMessage>], what: &str) -> Result<()> {
        let mut bytes = Vec::new();
        for m in msgs {
            m.header.sequence_number = self.seq;
            self.seq = self.seq.wrapping_add(1);
            m.finalize();
            let start = bytes.len();
            bytes.resize(start + m.buffer_len(), 0);
            m.serialize(&mut bytes[start..]);
            mark_nested(&mut bytes[start..], CTA_FILTER);
        }
        self.socket
            .send(&bytes, 0)
            .map(drop)
            .map_err(|e| Error::io(what, e))
    }

    /// Receives one datagram and hands each message in it to `each`; `each` returns whether
    /// it has seen the last message it waits for.
    fn recv(
        &mut self,
        what: &str,
        each: &mut dyn FnMut(NetlinkMessage<NetfilterMessage>) -> Result<bool>,
    ) -> Result<bool> {
        let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout { what: what.into() });
            }
            Err(e) => return Err(Error::io(what, e)),
        };
        let mut off = 0;
        let mut done = false;
        while off < n {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[off..n])
                .map_err(|e| Error::netlink(what, e))?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
            done |= each(msg)?;
        }
        Ok(done)
    }

    /// The entries of `family` that `targets` matches: what a deletion needs (the original
    /// tuple, and the entry's id and zone when dumped). `filter` (see [`source_filter`]), if
    /// any, has the kernel send the entries it matches only.
    fn matching(
        &mut self,
        family: NetfilterProtoFamily,
        targets: &Targets,
        filter: Vec<ConntrackAttribute>,
    ) -> Result<Vec<Vec<ConntrackAttribute>>> {
        let what = "dump conntrack entries";
        let mut get = [message(
            family,
            ConntrackMessage::Get(filter),
            NLM_F_REQUEST | NLM_F_DUMP,
        )];
        self.send(&mut get, what)?;
        let seq = get[0].header.sequence_number;
        let mut found = Vec::new();
        loop {
            let done = self.recv(what, &mut |msg| {
                if msg.header.sequence_number != seq {
                    return Ok(false);
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => Ok(true),
                    NetlinkPayload::Error(e) if e.code.is_some() => Err(Error::Kernel {
                        what: what.into(),
                        source: e.to_io(),
                    }),
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    }) => {
                        let orig = attrs.iter().find_map(|a| match a {
                            ConntrackAttribute::CtaTupleOrig(t) => Some(t),
                            _ => None,
                        });
                        let reply_src = attrs.iter().find_map(|a| match a {
                            ConntrackAttribute::CtaTupleReply(t) => source_of(t),
                            _ => None,
                        });
                        if orig
                            .and_then(|t| flow_of(t))
                            .map(|f| Flow { reply_src, ..f })
                            .is_some_and(|f| targets.matches(&f))
                        {
                            found.push(
                                attrs
                                    .into_iter()
                                    .filter(|a| match a {
                                        ConntrackAttribute::CtaTupleOrig(_) => true,
                                        ConntrackAttribute::Other(n) => {
                                            matches!(n.kind() & 0x3fff, CTA_ID | CTA_ZONE)
                                        }
                                        _ => false,
                                    })
                                    .collect(),
                            );
                        }
                        Ok(false)
                    }
                    _ => Ok(false),
                }
            })?;
            if done {
                return Ok(found);
            }
        }
    }

    /// Deletes the entries, a window at a time; returns how many the kernel deleted. An entry
    /// already gone (it timed out, or its flow closed) is not an error.
    fn delete(
        &mut self,
        family: NetfilterProtoFamily,
        entries: Vec<Vec<ConntrackAttribute>>,
    ) -> Result<usize> {
        let what = "delete conntrack entries";
        let mut deleted = 0;
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let mut msgs: Vec<_> = entries
                .by_ref()
                .take(DELETES_IN_FLIGHT)
                .map(|attrs| {
                    message(
                        family,
                        ConntrackMessage::Delete(attrs),
                        NLM_F_REQUEST | NLM_F_ACK,
                    )
                })
                .collect();
            self.send(&mut msgs, what)?;
            let mut awaited: HashSet<u32> = msgs.iter().map(|m| m.header.sequence_number).collect();
            while !awaited.is_empty() {
                self.recv(what, &mut |msg| {
                    if let NetlinkPayload::Error(e) = msg.payload
                        && awaited.remove(&msg.header.sequence_number)
                    {
                        match e.code {
                            None => deleted += 1,
                            Some(_) if e.to_io().raw_os_error() == Some(libc::ENOENT) => {}
                            Some(_) => {
                                return Err(Error::Kernel {
                                    what: what.into(),
                                    source: e.to_io(),
                                });
                            }
                        }
                    }
                    Ok(false)
                })?;
            }
        }
        Ok(deleted)
    }
}

/// Deletes the conntrack entries of flows from any of `sources` to any of `dests` (an address
/// key: every flow to it; an address-port key: flows of that protocol to that port), except
/// flows that an address-port key of `spare` still allows, in the calling thread's network
/// namespace. No `sources` means any source (an attached namespace: every flow in it is the
/// sandbox's). Returns how many entries were deleted.
///
/// For a policy swap: `delete_flows(&ctx.peers, &revoked.keys, &revoked.narrowed)`.
pub fn delete_flows(
    sources: &[IpAddr],
    dests: &[ElementKey],
    spare: &[ElementKey],
) -> Result<usize> {
    delete_matching(&Targets::new(sources, dests, spare))
}

/// Deletes the conntrack entries of every flow of the calling thread's namespace to a
/// destination off it: not loopback, not one of `local` (its own addresses, which inbound
/// connections are to), forwarded ones included. For a namespace just attached: what it had
/// open before starts anew under the policy. Returns how many entries were deleted.
pub fn delete_outgoing(local: &[IpAddr]) -> Result<usize> {
    delete_matching(&Targets {
        every_off: Some(local.iter().copied().collect()),
        ..Targets::default()
    })
}

/// A ctnetlink socket kept open for [`Conntrack::delete_involving`]. Closing a netfilter
/// socket waits for nf_tables' deferred destruction (see [`crate::exit`]): a run keeps this
/// one until its exit child holds it.
#[derive(Debug)]
pub struct Conntrack {
    ct: Ctnetlink,
}

impl Conntrack {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        Ok(Conntrack {
            ct: Ctnetlink::open()?,
        })
    }

    /// Deletes the conntrack entries of every flow from one of `addrs` (original source)
    /// and, with `inbound`, to one of them (reply source: connections a publish DNATed to
    /// them, or from other sandboxes of a network): what a sandbox that had those addresses
    /// leaves behind. Left in place, they would let the next sandbox given the same address
    /// use its flows as established ones, past its own policy. Returns how many were
    /// deleted.
    ///
    /// One dump per address (filtered by the kernel), or with `inbound` one per family
    /// (filtered here); each walks every bucket of the conntrack hash table: about 10 ms on
    /// the machines we measure on even when it is empty, 20 with 50,000 entries.
    pub fn delete_involving(&mut self, addrs: &[IpAddr], inbound: bool) -> Result<usize> {
        let targets = Targets {
            involving: Some(addrs.iter().copied().collect()),
            inbound,
            ..Targets::default()
        };
        delete_with(&mut self.ct, &targets)
    }
}

/// [`Conntrack::delete_involving`] on a socket of its own, closed after.
pub fn delete_involving(addrs: &[IpAddr], inbound: bool) -> Result<usize> {
    Conntrack::open()?.delete_involving(addrs, inbound)
}

fn delete_matching(targets: &Targets) -> Result<usize> {
    if !targets.has_family(true) && !targets.has_family(false) {
        return Ok(0);
    }
    delete_with(&mut Ctnetlink::open()?, targets)
}

/// Deletes the entries `targets` matches, on an open socket.
fn delete_with(ct: &mut Ctnetlink, targets: &Targets) -> Result<usize> {
    let mut deleted = 0;
    for (v4, family) in [
        (true, NetfilterProtoFamily::IPv4),
        (false, NetfilterProtoFamily::IPv6),
    ] {
        if !targets.has_family(v4) {
            continue;
        }
        let found = match &targets.involving {
            // Flows from a few addresses among possibly many: the kernel picks them (one
            // filtered dump per address) instead of copying every entry out (50,000 entries:
            // 130 ms against 40). A kernel before 5.9 ignores the filter and sends every
            // entry, which `targets` then picks. Flows to them (`inbound`) are picked here,
            // from one unfiltered dump: the kernel's reply-direction filter matched nothing
            // before 5.16 (fixed by "netfilter: ctnetlink: fix filtering with
            // CTA_TUPLE_REPLY"), silently.
            Some(addrs) if !targets.inbound => {
                let mut found = Vec::new();
                for addr in addrs.iter().filter(|a| a.is_ipv4() == v4) {
                    found.extend(ct.matching(family, targets, source_filter(*addr))?);
                }
                found
            }
            _ => ct.matching(family, targets, Vec::new())?,
        };
        deleted += ct.delete(family, found)?;
    }
    Ok(deleted)
}

/// Sets `NLA_F_NESTED` on the top-level attribute `kind` of one serialized ctnetlink message:
/// the crate emits an attribute it has no variant for (`Other`) without it, and the kernel
/// parses `CTA_FILTER` strictly (`nla_parse_nested`), refusing it unflagged (EINVAL).
fn mark_nested(msg: &mut [u8], kind: u16) {
    // nlmsghdr (16 bytes) and nfgenmsg (4), then the attributes.
    let mut off = 20;
    while off + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[off], msg[off + 1]]));
        let ty = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]);
        if len < 4 {
            return;
        }
        if ty & 0x3fff == kind {
            msg[off + 2..off + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        }
        off += (len + 3) & !3;
    }
}

/// `CTA_FILTER` and its nested attribute of original-direction flags; the flag
/// `CTA_FILTER_F_CTA_IP_SRC` (`net/netfilter/nf_internals.h`).
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_F_CTA_IP_SRC: u32 = 1;

/// The attributes of a dump of the entries whose original source is `addr`. The filter is
/// sent flagged as nested by [`mark_nested`]: the crate cannot flag an attribute it has no
/// variant for.
fn source_filter(addr: IpAddr) -> Vec<ConntrackAttribute> {
    // One nested u32 attribute, in host byte order (NLA_U32).
    let mut nested = Vec::with_capacity(8);
    nested.extend_from_slice(&8u16.to_ne_bytes());
    nested.extend_from_slice(&CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
    nested.extend_from_slice(&CTA_FILTER_F_CTA_IP_SRC.to_ne_bytes());
    vec![
        ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![IPTuple::SourceAddress(addr)])]),
        ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER, nested)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_policy::Protocol;

    fn flow(src: &str, dst: &str, proto: u8, dport: u16) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            dport: Some(dport),
            reply_src: None,
        }
    }

    /// The filter of a dump reaches the kernel flagged as nested, which it requires.
    #[test]
    fn a_source_filter_is_sent_nested() {
        let addr: IpAddr = "203.0.113.130".parse().unwrap();
        let mut m = message(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::Get(source_filter(addr)),
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        m.finalize();
        let mut bytes = vec![0; m.buffer_len()];
        m.serialize(&mut bytes);
        mark_nested(&mut bytes, CTA_FILTER);
        let filter = (CTA_FILTER | NLA_F_NESTED).to_ne_bytes();
        // The original tuple (nested by the crate), then the filter: its flags, then its
        // original-direction flags attribute holding CTA_FILTER_F_CTA_IP_SRC.
        let tail = &bytes[bytes.len() - 12..];
        assert_eq!(&tail[2..4], &filter);
        assert_eq!(&tail[6..8], &CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
        assert_eq!(&tail[8..12], &CTA_FILTER_F_CTA_IP_SRC.to_ne_bytes());
    }

    /// A gone sandbox's flows: the ones it opened, and the ones a publish DNATed to it (the
    /// reply comes from its address); nobody else's, whatever the destination.
    #[test]
    fn involving_matches_flows_from_an_address_or_dnated_to_it() {
        let gone: IpAddr = "203.0.113.130".parse().unwrap();
        let t = Targets {
            involving: Some([gone].into_iter().collect()),
            inbound: true,
            ..Targets::default()
        };
        assert!(t.matches(&flow("203.0.113.130", "198.51.100.1", 17, 9999)));
        let published = Flow {
            reply_src: Some(gone),
            ..flow("198.51.100.7", "203.0.113.129", 6, 8080)
        };
        assert!(t.matches(&published));
        assert!(!t.matches(&flow("203.0.113.134", "198.51.100.1", 17, 9999)));
        let to_the_host = Flow {
            reply_src: Some("203.0.113.129".parse().unwrap()),
            ..flow("198.51.100.1", "203.0.113.129", 6, 80)
        };
        assert!(!t.matches(&to_the_host));
        assert!(t.has_family(true) && !t.has_family(false));
        let outbound_only = Targets {
            inbound: false,
            ..t
        };
        assert!(!outbound_only.matches(&published));
    }

    #[test]
    fn matches_source_and_destination_and_port_when_the_key_has_one() {
        let sb: IpAddr = "203.0.113.130".parse().unwrap();
        let t = Targets::new(
            &[sb],
            &[
                ElementKey::Addr("198.51.100.1".parse().unwrap()),
                ElementKey::AddrPort("198.51.100.2".parse().unwrap(), Protocol::Tcp, 443),
            ],
            &[ElementKey::AddrPort(
                "198.51.100.1".parse().unwrap(),
                Protocol::Tcp,
                443,
            )],
        );
        assert!(
            !t.matches(&flow("203.0.113.130", "198.51.100.1", 6, 443)),
            "spared"
        );
        assert!(t.matches(&flow("203.0.113.130", "198.51.100.1", 17, 53)));
        assert!(t.matches(&flow("203.0.113.130", "198.51.100.2", 6, 443)));
        assert!(!t.matches(&flow("203.0.113.130", "198.51.100.2", 6, 80)));
        assert!(!t.matches(&flow("203.0.113.130", "198.51.100.2", 17, 443)));
        assert!(!t.matches(&flow("203.0.113.131", "198.51.100.1", 6, 443)));
        assert!(!t.matches(&flow("203.0.113.130", "198.51.100.3", 6, 443)));
        assert!(t.has_family(true));
        assert!(!t.has_family(false));
    }

    #[test]
    fn outgoing_means_off_loopback_and_not_to_the_namespace_itself() {
        let t = Targets {
            every_off: Some(["203.0.113.10".parse().unwrap()].into_iter().collect()),
            ..Targets::default()
        };
        assert!(t.matches(&flow("203.0.113.10", "198.51.100.1", 6, 443)));
        assert!(t.matches(&flow("203.0.113.10", "198.51.100.53", 17, 53)));
        assert!(
            !t.matches(&flow("198.51.100.1", "203.0.113.10", 6, 80)),
            "inbound"
        );
        assert!(!t.matches(&flow("127.0.0.1", "127.0.0.1", 6, 5432)));
        assert!(!t.matches(&flow("::1", "::1", 6, 5432)));
        assert!(t.has_family(true) && t.has_family(false));
    }

    #[test]
    fn no_sources_means_every_source() {
        let t = Targets::new(
            &[],
            &[ElementKey::Addr("2001:db8::1".parse().unwrap())],
            &[],
        );
        assert!(t.matches(&flow("2001:db8:5::9", "2001:db8::1", 6, 443)));
        assert!(!t.matches(&flow("2001:db8:5::9", "2001:db8::2", 6, 443)));
        assert!(t.has_family(false));
        assert!(!t.has_family(true));
    }
}
