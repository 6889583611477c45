//! The learn log: JSON lines, one event per line, with a versioned schema.
//!
//! The first line is a `header` (schema name and version); then `query` and `flow` events in
//! the order they happened; a log written by `portcullis learn` ends with an `end` event.
//! Times are RFC 3339 in UTC with milliseconds. Readers accept unknown fields (a later minor
//! addition) but refuse another schema version.
//!
//! ```text
//! {"type":"header","schema":"portcullis-learn-log","version":1,"started":"2026-11-22T10:00:00.000Z","source":"portcullis learn","command":["./job.sh"]}
//! {"type":"query","time":"2026-11-22T10:00:00.120Z","name":"api.example.com","qtype":"A","rcode":"NOERROR","answers":["198.51.100.7"],"cnames":["edge.example.net"],"ttl":300}
//! {"type":"flow","time":"2026-11-22T10:00:00.125Z","protocol":"tcp","address":"198.51.100.7","port":443,"names":["api.example.com"]}
//! {"type":"flow","time":"2026-11-22T10:00:01.000Z","protocol":"udp","address":"198.51.100.209","port":5000,"names":[]}
//! {"type":"end","time":"2026-11-22T10:00:02.000Z","exit_code":0,"queries":1,"flows":2,"flows_lost":0}
//! ```

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The `schema` field of every header.
pub const SCHEMA: &str = "portcullis-learn-log";
/// The schema version this build writes and reads.
pub const VERSION: u32 = 1;
/// The `source` of logs written by `portcullis learn`.
pub const LEARN_SOURCE: &str = "portcullis learn";

/// One line of a learn log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Header(Header),
    Query(Query),
    Flow(Flow),
    End(End),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Always [`VERSION`] for logs this build writes.
    pub version: u32,
    /// When the run (or the imported log) started.
    pub started: String,
    /// What wrote the log: "portcullis learn", "dnsmasq log-queries (FILE)".
    pub source: String,
    /// The command that was learned, when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// A DNS query and its answer, as the relay saw them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub time: String,
    /// The queried name: lowercase, no trailing dot.
    pub name: String,
    /// Record type as in zone files: "A", "AAAA", "TXT", "TYPE65"...
    pub qtype: String,
    /// "NOERROR", "NXDOMAIN", "SERVFAIL"... ; "TIMEOUT" when no answer came.
    pub rcode: String,
    /// A and AAAA addresses the answer bound to `name` (those on its CNAME chain).
    #[serde(default)]
    pub answers: Vec<IpAddr>,
    /// The CNAME chain from `name`, in order (each target), without `name` itself.
    #[serde(default)]
    pub cnames: Vec<String>,
    /// Smallest TTL among the answer records, as received from upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// A new flow (connection) leaving the sandbox, seen on its first packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub time: String,
    /// "tcp", "udp", "icmp", "icmpv6", or "proto-N" for other IP protocols.
    pub protocol: String,
    /// Destination address.
    pub address: IpAddr,
    /// Destination port, for TCP and UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Queried names whose answers held `address` when the flow started; empty for a direct
    /// flow (a hard-coded address, no DNS lookup).
    #[serde(default)]
    pub names: Vec<String>,
    /// Every name in `names` had an answer whose lifetime under `run` (its TTL, at least
    /// `--min-ttl`, plus a second) had ended when the flow started: under `run` this
    /// connection is blocked unless the name is resolved again first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    /// Packets and bytes sent and received, where the log writer could count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl Flow {
    /// Whether the flow went to an address no DNS answer gave.
    pub fn is_direct(&self) -> bool {
        self.names.is_empty()
    }
}

/// The last line of a log written by `portcullis learn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub time: String,
    /// The command's exit code.
    pub exit_code: i32,
    pub queries: u64,
    pub flows: u64,
    /// Times the kernel reported logged packets lost (a full NFLOG socket buffer), each time
    /// one flow or more: non-zero means the log is incomplete.
    #[serde(default)]
    pub flows_lost: u64,
}

/// RFC 3339, UTC, milliseconds: the time format of every event.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Now, as [`timestamp`].
pub fn now() -> String {
    timestamp(SystemTime::now())
}

/// The time a [`timestamp`] names; None for anything else.
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

impl Event {
    /// The header of a new log.
    pub fn header(source: &str, command: &[String]) -> Event {
        Event::Header(Header {
            schema: SCHEMA.to_owned(),
            version: VERSION,
            started: now(),
            source: source.to_owned(),
            command: command.to_vec(),
        })
    }

    /// The event as one JSON line, with its newline.
    pub fn to_line(&self) -> String {
        // Serializing these types cannot fail: no maps with non-string keys, no floats.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}
