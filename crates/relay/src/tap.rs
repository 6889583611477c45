//! The relay's tap: an optional observer of every DNS message a sandbox's relay receives and
//! sends (client queries and responses, queries forwarded upstream and their answers), with
//! the sandbox's label, the addresses, the transport and the times. The binary wires a dnstap
//! producer into it; the relay itself knows no dnstap. Without a tap, the relay pays one
//! `Option` check per message.

use std::net::SocketAddr;
use std::time::SystemTime;

/// Which message of a query's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapKind {
    /// A query from the sandbox, as received.
    ClientQuery,
    /// The relay's answer to the sandbox, as sent.
    ClientResponse,
    /// A query forwarded to an upstream resolver.
    ForwarderQuery,
    /// An upstream resolver's answer, as received.
    ForwarderResponse,
}

/// One tapped message. For CLIENT_*, `peer` is the sandbox's client; for FORWARDER_*, the
/// upstream resolver.
#[derive(Debug, Clone, Copy)]
pub struct TapEvent<'a> {
    pub kind: TapKind,
    /// The sandbox's label (`SandboxCtx::with_label`; by default its table name).
    pub sandbox: &'a str,
    pub tcp: bool,
    pub peer: SocketAddr,
    /// The query, in wire form.
    pub query: &'a [u8],
    pub query_time: SystemTime,
    /// The response, in wire form (responses only).
    pub response: Option<&'a [u8]>,
    pub response_time: Option<SystemTime>,
}

/// Receives tapped messages. Called on the relay's tasks: it must not block.
pub trait DnsTap: Send + Sync + std::fmt::Debug {
    fn tap(&self, event: &TapEvent<'_>);
}
