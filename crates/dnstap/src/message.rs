//! Building dnstap messages from what a DNS relay saw (its kind, transport, addresses, times
//! and wire messages), and reading back what a consumer needs from one: the client's address
//! and the response it was sent.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message as _;

use crate::proto;

/// The dnstap message types Portcullis produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClientQuery,
    ClientResponse,
    ForwarderQuery,
    ForwarderResponse,
}

impl Kind {
    fn proto(self) -> proto::message::Type {
        match self {
            Kind::ClientQuery => proto::message::Type::ClientQuery,
            Kind::ClientResponse => proto::message::Type::ClientResponse,
            Kind::ForwarderQuery => proto::message::Type::ForwarderQuery,
            Kind::ForwarderResponse => proto::message::Type::ForwarderResponse,
        }
    }
}

/// The transport a DNS message travelled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One event, borrowed from whoever saw it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub kind: Kind,
    /// The dnstap `identity`: Portcullis puts the sandbox's label here.
    pub identity: &'a str,
    pub transport: Transport,
    /// The initiator: the client for CLIENT_*, the relay for FORWARDER_* (when known).
    pub query_address: Option<SocketAddr>,
    /// The responder: the relay for CLIENT_* (when known), the upstream for FORWARDER_*.
    pub response_address: Option<SocketAddr>,
    pub query: Option<&'a [u8]>,
    pub query_time: Option<SystemTime>,
    pub response: Option<&'a [u8]>,
    pub response_time: Option<SystemTime>,
}

/// The `version` field of every message Portcullis sends.
pub const VERSION: &str = concat!("portcullis ", env!("CARGO_PKG_VERSION"));

fn split_time(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The dnstap message for `e`.
pub fn build(e: &Event<'_>) -> proto::Dnstap {
    let family = e.query_address.or(e.response_address).map(|a| match a {
        SocketAddr::V4(_) => proto::SocketFamily::Inet,
        SocketAddr::V6(_) => proto::SocketFamily::Inet6,
    });
    let (qs, qn) = e.query_time.map(split_time).unzip();
    let (rs, rn) = e.response_time.map(split_time).unzip();
    let message = proto::Message {
        r#type: e.kind.proto() as i32,
        socket_family: family.map(|f| f as i32),
        socket_protocol: Some(match e.transport {
            Transport::Udp => proto::SocketProtocol::Udp as i32,
            Transport::Tcp => proto::SocketProtocol::Tcp as i32,
        }),
        query_address: e.query_address.map(|a| addr_bytes(a.ip())),
        response_address: e.response_address.map(|a| addr_bytes(a.ip())),
        query_port: e.query_address.map(|a| u32::from(a.port())),
        response_port: e.response_address.map(|a| u32::from(a.port())),
        query_time_sec: qs,
        query_time_nsec: qn,
        query_message: e.query.map(<[u8]>::to_vec),
        response_time_sec: rs,
        response_time_nsec: rn,
        response_message: e.response.map(<[u8]>::to_vec),
        ..Default::default()
    };
    proto::Dnstap {
        identity: Some(e.identity.as_bytes().to_vec()),
        version: Some(VERSION.as_bytes().to_vec()),
        extra: None,
        r#type: proto::dnstap::Type::Message as i32,
        message: Some(message),
    }
}

/// `e` as a dnstap message in protobuf wire form, written directly into one buffer of the
/// right size: the same message as `encode(&build(e))` (a test checks it), without building
/// the intermediate structure. This is what the relay's tap pays per message.
pub fn encode_event(e: &Event<'_>) -> Bytes {
    use bytes::BufMut as _;
    fn varint_len(mut v: u64) -> usize {
        let mut n = 1;
        while v >= 0x80 {
            v >>= 7;
            n += 1;
        }
        n
    }
    fn put_varint(b: &mut bytes::BytesMut, mut v: u64) {
        while v >= 0x80 {
            b.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        b.put_u8(v as u8);
    }
    fn bytes_len(tag_len: usize, data: usize) -> usize {
        tag_len + varint_len(data as u64) + data
    }
    fn put_bytes(b: &mut bytes::BytesMut, tag: u8, data: &[u8]) {
        b.put_u8(tag);
        put_varint(b, data.len() as u64);
        b.put_slice(data);
    }
    let family = e.query_address.or(e.response_address).map(|a| match a {
        SocketAddr::V4(_) => proto::SocketFamily::Inet as u64,
        SocketAddr::V6(_) => proto::SocketFamily::Inet6 as u64,
    });
    let protocol = match e.transport {
        Transport::Udp => proto::SocketProtocol::Udp as u64,
        Transport::Tcp => proto::SocketProtocol::Tcp as u64,
    };
    let addr_len = |a: &SocketAddr| if a.is_ipv4() { 4 } else { 16 };
    let qt = e.query_time.map(split_time);
    let rt = e.response_time.map(split_time);
    // The Message's length first: every field is optional but the type.
    let mut m = 1 + varint_len(e.kind.proto() as u64);
    m += family.map_or(0, |f| 1 + varint_len(f));
    m += 1 + varint_len(protocol);
    if let Some(a) = &e.query_address {
        m += bytes_len(1, addr_len(a)) + 1 + varint_len(u64::from(a.port()));
    }
    if let Some(a) = &e.response_address {
        m += bytes_len(1, addr_len(a)) + 1 + varint_len(u64::from(a.port()));
    }
    if let Some((sec, _)) = qt {
        m += 1 + varint_len(sec) + 5;
    }
    m += e.query.map_or(0, |q| bytes_len(1, q.len()));
    if let Some((sec, _)) = rt {
        m += 1 + varint_len(sec) + 5;
    }
    m += e.response.map_or(0, |r| bytes_len(1, r.len()));
    let total = bytes_len(1, e.identity.len()) + bytes_len(1, VERSION.len()) + 2 + bytes_len(1, m);
    let mut b = bytes::BytesMut::with_capacity(total);
    put_bytes(&mut b, 0x0a, e.identity.as_bytes()); // 1: identity
    put_bytes(&mut b, 0x12, VERSION.as_bytes()); // 2: version
    b.put_u8(0x78); // 15: type = MESSAGE
    put_varint(&mut b, proto::dnstap::Type::Message as u64);
    b.put_u8(0x72); // 14: message
    put_varint(&mut b, m as u64);
    b.put_u8(0x08); // 1: type
    put_varint(&mut b, e.kind.proto() as u64);
    if let Some(f) = family {
        b.put_u8(0x10); // 2: socket_family
        put_varint(&mut b, f);
    }
    b.put_u8(0x18); // 3: socket_protocol
    put_varint(&mut b, protocol);
    if let Some(a) = &e.query_address {
        put_bytes(&mut b, 0x22, &addr_bytes(a.ip())); // 4: query_address
    }
    if let Some(a) = &e.response_address {
        put_bytes(&mut b, 0x2a, &addr_bytes(a.ip())); // 5: response_address
    }
    if let Some(a) = &e.query_address {
        b.put_u8(0x30); // 6: query_port
        put_varint(&mut b, u64::from(a.port()));
    }
    if let Some(a) = &e.response_address {
        b.put_u8(0x38); // 7: response_port
        put_varint(&mut b, u64::from(a.port()));
    }
    if let Some((sec, nsec)) = qt {
        b.put_u8(0x40); // 8: query_time_sec
        put_varint(&mut b, sec);
        b.put_u8(0x4d); // 9: query_time_nsec, fixed32
        b.put_u32_le(nsec);
    }
    if let Some(q) = e.query {
        put_bytes(&mut b, 0x52, q); // 10: query_message
    }
    if let Some((sec, nsec)) = rt {
        b.put_u8(0x60); // 12: response_time_sec
        put_varint(&mut b, sec);
        b.put_u8(0x6d); // 13: response_time_nsec, fixed32
        b.put_u32_le(nsec);
    }
    if let Some(r) = e.response {
        put_bytes(&mut b, 0x72, r); // 14: response_message
    }
    debug_assert_eq!(b.len(), total);
    b.freeze()
}

/// `d` in protobuf wire form: the payload of one data frame.
pub fn encode(d: &proto::Dnstap) -> Bytes {
    Bytes::from(d.encode_to_vec())
}

/// Decodes one data frame's payload.
pub fn decode(payload: &[u8]) -> Result<proto::Dnstap, prost::DecodeError> {
    proto::Dnstap::decode(payload)
}

/// The address and port of a message's initiator (the client of a CLIENT_RESPONSE).
pub fn query_address(m: &proto::Message) -> Option<SocketAddr> {
    let raw = m.query_address.as_deref()?;
    let ip = match raw.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(raw).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(raw).ok()?),
        _ => return None,
    };
    let port = m
        .query_port
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0);
    Some(SocketAddr::new(ip, port))
}

/// The message type's name as dnstap tools print it (`CLIENT_RESPONSE`...).
pub fn type_name(m: &proto::Message) -> String {
    proto::message::Type::try_from(m.r#type)
        .map(|t| t.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("TYPE{}", m.r#type))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_direct_encoder_writes_what_prost_writes() {
        let v4: SocketAddr = "203.0.113.130:40000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::53]:53".parse().unwrap();
        let long = vec![7u8; 300];
        for (kind, qa, ra, resp) in [
            (Kind::ClientQuery, Some(v4), None, None),
            (Kind::ClientResponse, Some(v4), None, Some(&long[..])),
            (Kind::ForwarderQuery, None, Some(v6), None),
            (Kind::ForwarderResponse, None, Some(v6), Some(&b"r"[..])),
            (Kind::ClientQuery, None, None, None),
        ] {
            let e = Event {
                kind,
                identity: "portcullis_0a1b2c3d",
                transport: Transport::Udp,
                query_address: qa,
                response_address: ra,
                query: Some(&long[..200]),
                query_time: Some(UNIX_EPOCH + std::time::Duration::new(1_795_369_940, 999)),
                response: resp,
                response_time: resp.map(|_| SystemTime::now()),
            };
            let direct = encode_event(&e);
            assert_eq!(decode(&direct).unwrap(), build(&e), "{kind:?}");
            assert_eq!(direct.len(), encode(&build(&e)).len(), "{kind:?}");
        }
    }

    #[test]
    fn a_client_response_round_trips() {
        let client: SocketAddr = "[2001:db8::7]:5353".parse().unwrap();
        let e = Event {
            kind: Kind::ClientResponse,
            identity: "pc-0a1b2c3d",
            transport: Transport::Tcp,
            query_address: Some(client),
            response_address: None,
            query: Some(b"q"),
            query_time: Some(UNIX_EPOCH + std::time::Duration::new(5, 7)),
            response: Some(b"r"),
            response_time: Some(SystemTime::now()),
        };
        let d = decode(&encode(&build(&e))).unwrap();
        let m = d.message.unwrap();
        assert_eq!(query_address(&m), Some(client));
        assert_eq!(type_name(&m), "CLIENT_RESPONSE");
        assert_eq!(m.query_time_sec, Some(5));
        assert_eq!(m.query_time_nsec, Some(7));
        assert_eq!(m.response_message.as_deref(), Some(&b"r"[..]));
        assert_eq!(d.identity.as_deref(), Some(&b"pc-0a1b2c3d"[..]));
    }
}
