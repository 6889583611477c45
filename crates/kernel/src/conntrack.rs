//! Cutting live flows: deleting the conntrack entries of connections from a sandbox to
//! destinations it may no longer reach, over ctnetlink (`NETLINK_NETFILTER`, subsystem
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
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, Nla as _,
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

/// The original direction of one tracked flow, as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    dport: Option<u16>,
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
        if self.every_off.is_some() {
            return true;
        }
        (self.sources.is_empty() || self.sources.iter().any(|a| a.is_ipv4() == v4))
            && (self.addrs.iter().any(|a| a.is_ipv4() == v4)
                || self.ports.iter().any(|(a, ..)| a.is_ipv4() == v4))
    }
}

/// The original tuple of a dumped entry, if complete.
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

    /// The entries of `family` whose original tuple `targets` matches: what a deletion needs
    /// (the original tuple, and the entry's id and zone when dumped).
    fn matching(
        &mut self,
        family: NetfilterProtoFamily,
        targets: &Targets,
    ) -> Result<Vec<Vec<ConntrackAttribute>>> {
        let what = "dump conntrack entries";
        let mut get = [message(
            family,
            ConntrackMessage::Get(Vec::new()),
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
                        if orig
                            .and_then(|t| flow_of(t))
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

fn delete_matching(targets: &Targets) -> Result<usize> {
    let mut deleted = 0;
    let mut ct = None;
    for (v4, family) in [
        (true, NetfilterProtoFamily::IPv4),
        (false, NetfilterProtoFamily::IPv6),
    ] {
        if !targets.has_family(v4) {
            continue;
        }
        let ct = match &mut ct {
            Some(ct) => ct,
            None => ct.insert(Ctnetlink::open()?),
        };
        let found = ct.matching(family, targets)?;
        deleted += ct.delete(family, found)?;
    }
    Ok(deleted)
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
        }
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
