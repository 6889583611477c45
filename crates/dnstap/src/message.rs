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
