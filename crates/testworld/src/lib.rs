//! A private internet for Portcullis's integration tests, built from network namespaces so
//! that tests move real packets without a single one leaving the machine (see
//! `shared/TESTNET.md`).
//!
//! [`World::new`] makes two namespaces with a per-run prefix: `<prefix>-up`, the uplink,
//! which plays the host that Portcullis runs on, and `<prefix>-w`, the world behind it. The
//! world owns 198.51.100.0/24 and 2001:db8::/48, runs an authoritative DNS server for the
//! test's [`Zone`] under `.test` on 198.51.100.53 and 2001:db8::53, runs TCP, UDP and HTTP
//! servers on request, and counts with nftables every packet that arrives from the uplink,
//! so that tests assert on the far side ("nothing from the sandbox arrived").
//!
//! Everything a world makes is removed when it drops, whether its test passed, failed or
//! panicked; [`cleanup_stale`] removes what killed runs left behind. The servers are Python
//! scripts run by Debian's `/usr/bin/python3`; the Debian packages the harness needs are
//! listed in this crate's `README.md`.
//!
//! Tests that use a world need root, and fail without it (see [`require_root`]).

#![forbid(unsafe_code)]

mod counters;
mod dns;
mod exec;
mod run;
mod servers;
mod world;
mod zone;

pub use dns::DnsQuery;
pub use run::cleanup_stale;
pub use world::World;
pub use zone::Zone;

use std::time::{Duration, Instant};

/// Calls `condition` every 10 ms until it holds or `timeout` has passed; whether it held.
///
/// Packets travel asynchronously: a UDP send returns before the world has counted the
/// datagram. Assert "it arrived" with `assert!(wait_until(timeout, || counter > 0))`, and
/// "it did not arrive" by waiting as long as a packet could take, then reading the counter.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Panics unless the process runs as root. Tests that need root fail without it, never
/// skip: a skipped test proves nothing, and CI would not notice.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "these tests need root; CI runs as root, yet this run has euid {euid}: \
             fix the CI job instead of skipping the tests"
        );
    }
    panic!(
        "these tests need root (they build network namespaces), and this process has euid \
         {euid}: run them as root, e.g. `sudo -E cargo nextest run -p <crate>`"
    );
}
