//! dnstap for Portcullis: the protobuf types generated at build time from the vendored, public
//! domain `proto/dnstap.proto` (by protox, without protoc), the Frame Streams codec (`fstrm`),
//! the producer that sends the relay's messages to a collector without ever making the relay
//! wait (`sink`), and the consumer server that accepts dnstap from a resolver (`listen`).
//!
//! This crate knows nothing of the relay or of nftables: the binary turns the relay's tap
//! events into [`proto::Dnstap`] messages, and the consumer's messages into set elements.

#![forbid(unsafe_code)]

pub mod fstrm;
pub mod listen;
pub mod message;
pub mod sink;

/// The generated dnstap protobuf types (package `dnstap`).
#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/dnstap.rs"));
}

pub use fstrm::{Control, ControlType, Frame, FstrmCodec, FstrmError};
pub use listen::{ListenAddr, ListenOptions, ListenStats};
pub use sink::{Destination, Sink, SinkOptions, SinkStats};
