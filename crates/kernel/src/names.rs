//! Names of every kernel object Portcullis creates, derived from one `SandboxId`.
//!
//! Nothing else in the code base types an interface, table or set name: they are all derived
//! here, with fixed prefixes, so that leftovers of a killed run can be recognised and removed.

use std::fmt;

/// Prefix of every nft table (`portcullis_<id>`, and the shared `portcullis` table).
pub const TABLE_PREFIX: &str = "portcullis_";
/// The shared table that confines forwarding to sandbox interfaces when Portcullis enabled it.
pub const GLOBAL_TABLE: &str = "portcullis";
/// Prefix of every interface (`pc-<id>-h` on the host side, `pc-<id>-s` before it moves).
pub const IF_PREFIX: &str = "pc-";

/// Dynamic sets, filled by the DNS relay over netlink.
pub const SET_ALLOW4: &str = "allow4";
pub const SET_ALLOW6: &str = "allow6";
pub const SET_ALLOW4_PORT: &str = "allow4p";
pub const SET_ALLOW6_PORT: &str = "allow6p";
/// Named counter of every packet dropped by the sandbox's egress and host-input chains.
pub const COUNTER_BLOCKED: &str = "blocked";
/// Interface name of the sandbox side, inside the sandbox.
pub const SANDBOX_IFNAME: &str = "eth0";

/// Eight lowercase hex digits naming one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 4];
        // /dev/urandom never blocks and never fails on Linux once the system is up; fall back
        // to time and pid mixing so that an odd environment still gets distinct ids.
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .is_err()
        {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            bytes = (t ^ std::process::id().rotate_left(16)).to_be_bytes();
        }
        SandboxId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Parses an id found in a name (table, interface, state file).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 8
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| SandboxId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The sandbox's nft table in the invoking namespace.
    pub fn table(&self) -> String {
        format!("{TABLE_PREFIX}{}", self.0)
    }

    /// Host side of the veth pair (13 bytes, below the 15-byte IFNAMSIZ limit).
    pub fn host_ifname(&self) -> String {
        format!("{IF_PREFIX}{}-h", self.0)
    }

    /// Sandbox side of the veth pair while it is still in the invoking namespace.
    pub fn peer_ifname(&self) -> String {
        format!("{IF_PREFIX}{}-s", self.0)
    }

    /// Recognises a table name of ours and returns its id.
    pub fn from_table(name: &str) -> Option<Self> {
        name.strip_prefix(TABLE_PREFIX).and_then(Self::parse)
    }

    /// Recognises a host-side interface name of ours and returns its id.
    pub fn from_ifname(name: &str) -> Option<Self> {
        name.strip_prefix(IF_PREFIX)
            .and_then(|rest| rest.strip_suffix("-h").or_else(|| rest.strip_suffix("-s")))
            .and_then(Self::parse)
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_and_round_trip() {
        let id = SandboxId::random();
        assert!(id.host_ifname().len() <= 15);
        assert_eq!(SandboxId::from_ifname(&id.host_ifname()), Some(id.clone()));
        assert_eq!(SandboxId::from_ifname(&id.peer_ifname()), Some(id.clone()));
        assert_eq!(SandboxId::from_table(&id.table()), Some(id.clone()));
        assert_eq!(SandboxId::from_table(GLOBAL_TABLE), None);
        assert_eq!(SandboxId::parse("ABCDEF01"), None);
        assert_eq!(SandboxId::parse("abc"), None);
    }
}
