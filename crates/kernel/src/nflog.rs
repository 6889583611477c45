//! Blocked packets reported by the sandbox's `log group N` rules, read from NFLOG.
//!
//! Each sandbox gets its own NFLOG group (one listener per group and namespace is all the
//! kernel allows); binding the group first reserves it before the rules that use it exist.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::{Error, Result};

/// One dropped packet, as far as the report needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockedPacket {
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6...).
    pub proto: u8,
    /// Destination port for TCP and UDP.
    pub dport: Option<u16>,
}

impl BlockedPacket {
    /// The protocol by name: "tcp", "udp", "icmp", "icmpv6", or "proto-N".
    pub fn protocol_name(&self) -> String {
        match self.proto {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            58 => "icmpv6".into(),
            n => format!("proto-{n}"),
        }
    }
}

/// Parses the network header of a logged packet.
pub fn parse_packet(p: &[u8]) -> Option<BlockedPacket> {
    let version = p.first()? >> 4;
    let (dst, proto, l4): (IpAddr, u8, usize) = match version {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            (Ipv4Addr::from(dst).into(), *p.get(9)?, ihl)
        }
        6 => {
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (Ipv6Addr::from(dst).into(), *p.get(6)?, 40)
        }
        _ => return None,
    };
    let dport = match proto {
        6 | 17 => p
            .get(l4 + 2..l4 + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]])),
        _ => None,
    };
    Some(BlockedPacket { dst, proto, dport })
}

/// Bytes of each logged packet copied to userspace: the IPv6 header and the ports fit.
const COPY_RANGE: u32 = 128;

/// A bound NFLOG group.
#[derive(Debug)]
pub struct NflogGroup {
    socket: Socket,
    pub group: u16,
    /// Times the kernel reported a full socket buffer (ENOBUFS): packets were logged and lost.
    lost: Arc<AtomicU64>,
}

impl NflogGroup {
    /// Binds the first free group among `candidates`.
    pub fn bind_any(candidates: impl IntoIterator<Item = u16>) -> Result<Self> {
        let mut last = None;
        for group in candidates {
            match Self::bind(group) {
                Ok(g) => return Ok(g),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Other("no NFLOG group to bind".into())))
    }

    fn bind(group: u16) -> Result<Self> {
        let what = format!("bind NFLOG group {group}");
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| Error::io(&what, e))?;
        socket.bind_auto().map_err(|e| Error::io(&what, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io(&what, e))?;
        for nlas in [
            vec![ConfigNla::Cmd(ConfigCmd::Bind)],
            vec![ConfigNla::Mode(ConfigMode::new_packet(COPY_RANGE))],
            // Each packet at once: by default the kernel batches up to 100 packets for up to
            // a second, so the flows of a run's last second never reached the report.
            vec![ConfigNla::QThresh(1)],
        ] {
            let msg = config_request(NetfilterProtoFamily::Unspec, group, nlas);
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            socket.send(&buf, 0).map_err(|e| Error::io(&what, e))?;
            let mut rbuf = vec![0u8; 4096];
            let n = socket
                .recv(&mut &mut rbuf[..], 0)
                .map_err(|e| Error::io(&what, e))?;
            let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&rbuf[..n])
                .map_err(|e| Error::netlink(&what, e))?;
            if let NetlinkPayload::Error(e) = reply.payload
                && e.code.is_some()
            {
                return Err(Error::Kernel {
                    what,
                    source: e.to_io(),
                });
            }
        }
        Ok(NflogGroup {
            socket,
            group,
            lost: Arc::default(),
        })
    }

    /// Raises the socket's receive buffer past `net.core.rmem_max` (needs CAP_NET_ADMIN), so
    /// that a burst of logged packets waits in the kernel instead of being lost.
    pub fn enlarge_buffer(&self, bytes: usize) -> Result<()> {
        crate::sockopt::force_recv_buffer(&self.socket, bytes)
            .map_err(|e| Error::io(format!("enlarge NFLOG group {} buffer", self.group), e))
    }

    /// Counts overflows of the socket buffer: non-zero means logged packets were lost.
    pub fn lost_counter(&self) -> Arc<AtomicU64> {
        self.lost.clone()
    }

    /// Reads packets on a dedicated thread until `stop` is set, calling `on_packet` for each.
    pub fn spawn_reader<F>(
        self,
        stop: Arc<AtomicBool>,
        mut on_packet: F,
    ) -> Result<std::thread::JoinHandle<()>>
    where
        F: FnMut(BlockedPacket) + Send + 'static,
    {
        // A short receive timeout lets the thread notice `stop`.
        crate::nft::sets::set_recv_timeout(&self.socket, Duration::from_millis(200))
            .map_err(|e| Error::io(format!("configure NFLOG group {}", self.group), e))?;
        std::thread::Builder::new()
            .name(format!("nflog-{}", self.group))
            .spawn(move || {
                // Filled by `recv` from the start: only the pages messages reach are touched.
                let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
                loop {
                    buf.clear();
                    // Once stopped (CMD has exited), what the kernel logged is already queued
                    // on the socket: read it without waiting, then end.
                    let stopping = stop.load(Ordering::Relaxed);
                    let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
                    // What was received is `buf` (never more than was written into it).
                    match self.socket.recv(&mut buf, flags) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            self.lost.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(_) if stopping => break,
                        Err(_) => continue,
                    };
                    let mut off = 0;
                    while off < buf.len() {
                        let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..])
                        else {
                            break;
                        };
                        let len = msg.header.length as usize;
                        if len == 0 {
                            break;
                        }
                        off += (len + 3) & !3;
                        if let NetlinkPayload::InnerMessage(NetfilterMessage {
                            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                            ..
                        }) = msg.payload
                        {
                            for nla in nlas {
                                if let PacketNla::Payload(p) = nla
                                    && let Some(pkt) = parse_packet(&p)
                                {
                                    on_packet(pkt);
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawn NFLOG reader", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_over_ipv4_and_udp_over_ipv6() {
        let mut v4 = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 203, 0, 113, 130, 198, 51, 100, 7,
        ];
        v4.extend_from_slice(&[0x30, 0x39, 0x01, 0xbb]);
        assert_eq!(
            parse_packet(&v4),
            Some(BlockedPacket {
                dst: "198.51.100.7".parse().unwrap(),
                proto: 6,
                dport: Some(443)
            })
        );
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&"2001:db8:fffe::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
        assert_eq!(
            parse_packet(&v6),
            Some(BlockedPacket {
                dst: "2001:db8::7".parse().unwrap(),
                proto: 17,
                dport: Some(53)
            })
        );
        assert_eq!(parse_packet(&[0x45, 0]), None);
        assert_eq!(parse_packet(&[]), None);
    }
}
