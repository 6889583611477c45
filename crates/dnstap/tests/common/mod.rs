//! Helpers of the dnstap crate's tests: DNS messages in wire form, dnstap events, and a log
//! capture.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use portcullis_dnstap::message::{self, Event, Kind, Transport};
use portcullis_dnstap::proto;

/// An A query for ok.test with ID 0x1234, in wire form.
pub fn query() -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(b"\x02ok\x04test\x00\x00\x01\x00\x01");
    m
}

/// The answer: ok.test A 198.51.100.10, TTL 300.
pub fn response() -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    m.extend_from_slice(b"\x02ok\x04test\x00\x00\x01\x00\x01");
    m.extend_from_slice(&[
        0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x01, 0x2c, 0, 4, 198, 51, 100, 10,
    ]);
    m
}

/// The four messages of one forwarded query, as the relay taps them.
pub fn messages(identity: &str) -> Vec<proto::Dnstap> {
    let client: SocketAddr = "203.0.113.130:40000".parse().unwrap();
    let upstream: SocketAddr = "198.51.100.53:53".parse().unwrap();
    let (q, r) = (query(), response());
    let now = SystemTime::now();
    [
        (Kind::ClientQuery, Some(client), None, false),
        (Kind::ForwarderQuery, None, Some(upstream), false),
        (Kind::ForwarderResponse, None, Some(upstream), true),
        (Kind::ClientResponse, Some(client), None, true),
    ]
    .into_iter()
    .map(|(kind, qa, ra, resp)| {
        message::build(&Event {
            kind,
            identity,
            transport: Transport::Udp,
            query_address: qa,
            response_address: ra,
            query: Some(&q),
            query_time: Some(now),
            response: resp.then_some(&r[..]),
            response_time: resp.then_some(now),
        })
    })
    .collect()
}

/// Everything logged while the guard lives, as text.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Installs the capture for this thread (tests run on a current-thread runtime).
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || me.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(sub)
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits up to `secs` for `f`.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f()
}
