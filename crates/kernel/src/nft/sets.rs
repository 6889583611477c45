//! Writing set elements over netlink: the DNS relay's hot path.
//!
//! One persistent `NETLINK_NETFILTER` socket; one batch per DNS answer
//! (BATCH_BEGIN, one NEWSETELEM per set touched with NLM_F_CREATE|NLM_F_ACK, BATCH_END),
//! and the caller waits for the kernel's acknowledgement of every message before the answer
//! is released. The batch is one transaction: either every element is in, or none is.
//!
//! Kernel behaviour this relies on (see shared/DEPENDENCIES.md): re-adding an element that
//! exists (no NLM_F_EXCL) replaces its timeout, even with a shorter one. Callers therefore only
//! ever write a timeout longer than what is live (the relay keeps the expiry map).

use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use portcullis_policy::Protocol;

use crate::names::{SET_ALLOW4, SET_ALLOW4_PORT, SET_ALLOW6, SET_ALLOW6_PORT};
use crate::{Error, Result};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// How long the relay waits for the kernel's acknowledgement before failing closed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// What one element allows: an address, or an address with a protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElementKey {
    Addr(IpAddr),
    AddrPort(IpAddr, Protocol, u16),
}

impl ElementKey {
    /// The set of the sandbox table this key belongs in.
    pub fn set_name(&self) -> &'static str {
        match self {
            ElementKey::Addr(IpAddr::V4(_)) => SET_ALLOW4,
            ElementKey::Addr(IpAddr::V6(_)) => SET_ALLOW6,
            ElementKey::AddrPort(IpAddr::V4(_), ..) => SET_ALLOW4_PORT,
            ElementKey::AddrPort(IpAddr::V6(_), ..) => SET_ALLOW6_PORT,
        }
    }

    /// The key as the kernel stores it: concatenated fields, each padded to 4 bytes.
    fn key_bytes(&self) -> Vec<u8> {
        fn addr(a: &IpAddr) -> Vec<u8> {
            match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            }
        }
        match self {
            ElementKey::Addr(a) => addr(a),
            ElementKey::AddrPort(a, proto, port) => {
                let mut k = addr(a);
                k.extend_from_slice(&[proto.number(), 0, 0, 0]);
                k.extend_from_slice(&port.to_be_bytes());
                k.extend_from_slice(&[0, 0]);
                k
            }
        }
    }
}

/// One element with its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    pub key: ElementKey,
    pub timeout: Duration,
}

/// Adds elements to a sandbox's sets. The real one speaks netlink; tests use a recorder.
pub trait SetWriter: Send + Sync + std::fmt::Debug {
    /// Adds every element to its set in `table`, all or none, and returns once the kernel
    /// acknowledged them. An error means nothing may be released to the sandbox.
    fn add(&self, table: &str, elements: &[Element]) -> Result<()>;
}

/// The netlink implementation: one socket for the whole process (every sandbox).
#[derive(Debug)]
pub struct NetlinkSetWriter {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

trait ProtocolNumber {
    fn number(&self) -> u8;
}
impl ProtocolNumber for Protocol {
    fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl NetlinkSetWriter {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let what = "open netlink socket for nftables set elements";
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| Error::io(what, e))?;
        socket.bind_auto().map_err(|e| Error::io(what, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io(what, e))?;
        socket.set_ext_ack(true).ok();
        set_recv_timeout(&socket, ACK_TIMEOUT).map_err(|e| Error::io(what, e))?;
        Ok(NetlinkSetWriter {
            inner: Mutex::new(Inner {
                socket,
                seq: 1,
                buf: vec![0; 65536],
            }),
        })
    }
}

/// Bounds how long `recv` on a netlink socket blocks.
pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a valid open socket owned by `socket`, and `tv` is a properly
    // initialised timeval whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn control(msg: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        msg,
    ));
    m.header.flags = NLM_F_REQUEST;
    m.header.sequence_number = seq;
    m
}

/// Encodes one batch; returns the bytes and the sequence numbers that await an ACK.
fn encode_batch(table: &str, elements: &[Element], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut by_set: Vec<(&'static str, Vec<ListAttribute<SetElementAttribute>>)> = Vec::new();
    for e in elements {
        let set = e.key.set_name();
        let attrs = vec![
            SetElementAttribute::Key(DataAttribute::Value(e.key.key_bytes())),
            // The kernel takes the timeout in milliseconds; nft sets refuse a zero timeout.
            SetElementAttribute::Timeout(e.timeout.as_millis().clamp(1000, u64::MAX as u128) as u64),
        ];
        match by_set.iter_mut().find(|(s, _)| *s == set) {
            Some((_, list)) => list.push(ListAttribute::Element(attrs)),
            None => by_set.push((set, vec![ListAttribute::Element(attrs)])),
        }
    }
    let mut seq = first_seq;
    let mut msgs = vec![control(ControlMessage::BatchBegin, seq)];
    let mut awaited = Vec::new();
    for (set, list) in by_set {
        seq = seq.wrapping_add(1);
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::NewSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.to_owned()),
                    SetElementList::Set(set.to_owned()),
                    SetElementList::Elements(list),
                ],
            }),
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
        m.header.sequence_number = seq;
        awaited.push(seq);
        msgs.push(m);
    }
    msgs.push(control(ControlMessage::BatchEnd, seq.wrapping_add(1)));
    let mut bytes = Vec::new();
    for mut m in msgs {
        m.finalize();
        let start = bytes.len();
        bytes.resize(start + m.buffer_len(), 0);
        m.serialize(&mut bytes[start..]);
    }
    (bytes, awaited)
}

impl SetWriter for NetlinkSetWriter {
    fn add(&self, table: &str, elements: &[Element]) -> Result<()> {
        if elements.is_empty() {
            return Ok(());
        }
        let what = || {
            format!(
                "add {} elements to the sets of table {table}",
                elements.len()
            )
        };
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Error::Other(format!("{}: writer poisoned", what())))?;
        let first = inner.seq;
        let (bytes, mut awaited) = encode_batch(table, elements, first);
        inner.seq = first.wrapping_add(awaited.len() as u32 + 2);
        inner
            .socket
            .send(&bytes, 0)
            .map_err(|e| Error::io(what(), e))?;
        let Inner { socket, buf, .. } = &mut *inner;
        let mut failure = None;
        while !awaited.is_empty() {
            let n = match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::Timeout { what: what() });
                }
                Err(e) => return Err(Error::io(what(), e)),
            };
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..n])
                    .map_err(|e| Error::netlink(what(), e))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                let seq = msg.header.sequence_number;
                if let NetlinkPayload::Error(err) = msg.payload {
                    awaited.retain(|s| *s != seq);
                    if err.code.is_some() && failure.is_none() {
                        failure = Some(err.to_io());
                    }
                }
            }
        }
        match failure {
            Some(source) => Err(Error::Kernel {
                what: what(),
                source,
            }),
            None => Ok(()),
        }
    }
}

/// The addresses an element key opens, for reporting.
pub fn key_addr(key: &ElementKey) -> IpAddr {
    match key {
        ElementKey::Addr(a) | ElementKey::AddrPort(a, ..) => *a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_groups_elements_per_set_and_awaits_one_ack_per_set() {
        let els = [
            Element {
                key: ElementKey::Addr("198.51.100.1".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::Addr("198.51.100.2".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::Addr("2001:db8::1".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::AddrPort("198.51.100.3".parse().unwrap(), Protocol::Tcp, 443),
                timeout: Duration::from_secs(60),
            },
        ];
        let (bytes, awaited) = encode_batch("portcullis_0a1b2c3d", &els, 7);
        assert_eq!(awaited, vec![8, 9, 10]);
        assert!(!bytes.is_empty());
    }

    #[test]
    fn port_keys_are_padded_fields() {
        let k = ElementKey::AddrPort("198.51.100.3".parse().unwrap(), Protocol::Udp, 0x1234);
        assert_eq!(
            k.key_bytes(),
            vec![198, 51, 100, 3, 17, 0, 0, 0, 0x12, 0x34, 0, 0]
        );
    }
}
