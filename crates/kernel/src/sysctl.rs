//! The host-wide settings a sandbox needs: IPv4 and IPv6 forwarding in the invoking namespace.
//!
//! Portcullis turns forwarding on only where it was off, records the values it found in the
//! state directory, confines forwarding to sandbox interfaces with the `portcullis` guard table
//! while it is on, and restores the recorded values when the last sandbox goes.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const V4: &str = "/proc/sys/net/ipv4/ip_forward";
const V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Forwarding values as found before Portcullis changed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    pub ipv4: bool,
    pub ipv6: bool,
}

fn read(path: &str) -> Result<bool> {
    std::fs::read_to_string(path)
        .map(|s| s.trim() != "0")
        .map_err(|e| Error::io(format!("read {path}"), e))
}

fn write(path: &str, on: bool) -> Result<()> {
    std::fs::write(path, if on { "1\n" } else { "0\n" })
        .map_err(|e| Error::io(format!("write {path}"), e))
}

impl Forwarding {
    pub fn read() -> Result<Self> {
        Ok(Forwarding {
            ipv4: read(V4)?,
            ipv6: read(V6)?,
        })
    }

    /// Turns both on.
    pub fn enable() -> Result<()> {
        write(V4, true)?;
        write(V6, true)
    }

    /// Writes these values back.
    pub fn restore(&self) -> Result<()> {
        write(V4, self.ipv4)?;
        write(V6, self.ipv6)
    }
}
