//! Names of every kernel object Portcullis creates, derived from one `SandboxId`.
//!
//! Nothing else in the code base types an interface, table or set name: they are all derived
//! here, with fixed prefixes, so that leftovers of a killed run can be recognised and removed.

use std::fmt;

/// Prefix of every nft table (`portcullis_<id>`, and the shared `portcullis` table).
pub const TABLE_PREFIX: &str = "portcullis_";
/// The `inet` table every sandbox of the namespace shares: one base chain per hook, which
/// dispatches each packet through maps keyed on its link to the one sandbox it concerns.
/// Each sandbox's chains, sets and counters live there under names ending in `_<id>`
/// ([`SandboxId::object`]).
pub const SHARED_TABLE: &str = "portcullis_sandboxes";
/// The shared table that confines forwarding to sandbox interfaces when Portcullis enabled it.
pub const GLOBAL_TABLE: &str = "portcullis";
/// Prefix of every interface (`pc-<id>-h` on the host side, `pc-<id>-s` before it moves).
pub const IF_PREFIX: &str = "pc-";
/// Prefix of the cgroup v2 group of a host-mode run (`portcullis-<id>` below the root).
pub const CGROUP_PREFIX: &str = "portcullis-";

/// Dynamic sets, filled by the DNS relay over netlink.
pub const SET_ALLOW4: &str = "allow4";
pub const SET_ALLOW6: &str = "allow6";
pub const SET_ALLOW4_PORT: &str = "allow4p";
pub const SET_ALLOW6_PORT: &str = "allow6p";
/// Named counter of every packet dropped by the sandbox's egress and host-input chains.
pub const COUNTER_BLOCKED: &str = "blocked";
/// Named counter of every frame the anti-spoofing table (`netdev portcullis_<id>`) drops.
pub const COUNTER_SPOOFED: &str = "spoofed";
/// The named counters of a sandbox's `inet` table that count the new IPv4 and IPv6 flows it
/// started (to the host or beyond): while one is 0, the sandbox left no conntrack entry of
/// that family to delete.
pub const COUNTER_OPENED4: &str = "opened4";
pub const COUNTER_OPENED6: &str = "opened6";
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

    /// The name of the sandbox's anti-spoofing table (`netdev`), and how logs, dnstap and
    /// the API name the sandbox.
    pub fn table(&self) -> String {
        format!("{TABLE_PREFIX}{}", self.0)
    }

    /// The name of the sandbox's chain, set or counter `base` in [`SHARED_TABLE`]:
    /// `<base>_<id>`.
    pub fn object(&self, base: &str) -> String {
        format!("{base}_{}", self.0)
    }

    /// Recognises an object of [`SHARED_TABLE`] named by [`SandboxId::object`] and returns
    /// its id.
    pub fn from_object(name: &str) -> Option<Self> {
        name.rsplit_once('_').and_then(|(_, id)| Self::parse(id))
    }

    /// The sandbox side's MAC address, set by Portcullis when it creates the link:
    /// `02:70:` and the id's four bytes (locally administered, unicast), so the anti-spoofing
    /// rules can be written before the link exists.
    pub fn sandbox_mac(&self) -> [u8; 6] {
        let mut mac = [0x02, 0x70, 0, 0, 0, 0];
        for (i, byte) in mac[2..].iter_mut().enumerate() {
            *byte = self
                .0
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
        mac
    }

    /// The sandbox's IPv6 link-local address: EUI-64 of `sandbox_mac` under fe80::/64, the
    /// address its kernel gives `eth0` (Portcullis sets `addr_gen_mode` to EUI-64 there).
    pub fn sandbox_link_local(&self) -> std::net::Ipv6Addr {
        let m = self.sandbox_mac();
        let word = |a: u8, b: u8| u16::from_be_bytes([a, b]);
        std::net::Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            word(m[0] ^ 0x02, m[1]),
            word(m[2], 0xff),
            word(0xfe, m[3]),
            word(m[4], m[5]),
        )
    }

    /// Host side of the veth pair (13 bytes, below the 15-byte IFNAMSIZ limit).
    pub fn host_ifname(&self) -> String {
        format!("{IF_PREFIX}{}-h", self.0)
    }

    /// Sandbox side of the veth pair while it is still in the invoking namespace.
    pub fn peer_ifname(&self) -> String {
        format!("{IF_PREFIX}{}-s", self.0)
    }

    /// The cgroup v2 group of a host-mode run, directly below the hierarchy's root.
    pub fn cgroup(&self) -> String {
        format!("{CGROUP_PREFIX}{}", self.0)
    }

    /// Recognises a cgroup name of ours and returns its id.
    pub fn from_cgroup(name: &str) -> Option<Self> {
        name.strip_prefix(CGROUP_PREFIX).and_then(Self::parse)
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

/// A validated network name (`portcullis network create NAME`): 1 to 32 of lowercase ASCII
/// letters, digits, `-` and `_`, starting with a letter or digit. Its kernel objects are named
/// after a hash of it, so any name fits the 15-byte interface limit.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct NetworkName(String);

impl TryFrom<String> for NetworkName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| {
            format!(
                "invalid network name {s:?}: 1 to 32 of a-z, 0-9, '-' and '_', starting with a letter or digit"
            )
        })
    }
}

impl From<NetworkName> for String {
    fn from(n: NetworkName) -> String {
        n.0
    }
}

impl NetworkName {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=32).contains(&s.len())
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        ok.then(|| NetworkName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// FNV-1a of the name, as 8 hex digits: what its bridge and table are named after.
    pub fn hash(&self) -> String {
        let h = self.0.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("{h:08x}")
    }

    /// The network's bridge: `pc-n<hash>` (12 bytes).
    pub fn bridge(&self) -> String {
        format!("{IF_PREFIX}n{}", self.hash())
    }

    /// The network's own `inet` table (redirects onto the bridge).
    pub fn table(&self) -> String {
        format!("{TABLE_PREFIX}n{}", self.hash())
    }

    /// The bridge's fixed MAC, `02:71:<hash>`: without one, a bridge takes its lowest port's
    /// MAC, which changes as sandboxes come and go.
    pub fn bridge_mac(&self) -> [u8; 6] {
        let h = u32::from_str_radix(&self.hash(), 16)
            .unwrap_or(0)
            .to_be_bytes();
        [0x02, 0x71, h[0], h[1], h[2], h[3]]
    }
}

/// The hash in a network bridge's name (`pc-n<hash>`), for `cleanup` to recognise a bridge
/// that no network record names.
pub fn network_hash_of_bridge(ifname: &str) -> Option<&str> {
    ifname
        .strip_prefix(IF_PREFIX)
        .and_then(|r| r.strip_prefix('n'))
        .filter(|h| SandboxId::parse(h).is_some())
}

/// The hash in a network table's name (`portcullis_n<hash>`).
pub fn network_hash_of_table(table: &str) -> Option<&str> {
    table
        .strip_prefix(TABLE_PREFIX)
        .and_then(|r| r.strip_prefix('n'))
        .filter(|h| SandboxId::parse(h).is_some())
}

impl fmt::Display for NetworkName {
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
        let net = NetworkName::parse("build-net_1").unwrap();
        assert!(net.bridge().len() <= 15 && net.bridge().starts_with("pc-n"));
        assert_eq!(SandboxId::from_ifname(&net.bridge()), None);
        assert_eq!(SandboxId::from_table(&net.table()), None);
        assert_eq!(
            network_hash_of_bridge(&net.bridge()),
            Some(net.hash().as_str())
        );
        assert_eq!(
            network_hash_of_table(&net.table()),
            Some(net.hash().as_str())
        );
        assert_eq!(network_hash_of_bridge(&id.host_ifname()), None);
        assert!(NetworkName::parse("Bad").is_none() && NetworkName::parse("-x").is_none());
        assert_eq!(SandboxId::from_ifname(&id.host_ifname()), Some(id.clone()));
        assert_eq!(SandboxId::from_ifname(&id.peer_ifname()), Some(id.clone()));
        assert_eq!(SandboxId::from_table(&id.table()), Some(id.clone()));
        assert_eq!(SandboxId::from_table(GLOBAL_TABLE), None);
        assert_eq!(SandboxId::from_table(SHARED_TABLE), None);
        assert_eq!(network_hash_of_table(SHARED_TABLE), None);
        assert_eq!(id.object("allow4p"), format!("allow4p_{id}"));
        assert_eq!(
            SandboxId::from_object(&id.object("publish_in")),
            Some(id.clone())
        );
        assert_eq!(SandboxId::from_object("forward_from4"), None);
        assert_eq!(SandboxId::from_cgroup(&id.cgroup()), Some(id.clone()));
        assert_eq!(SandboxId::parse("ABCDEF01"), None);
        assert_eq!(SandboxId::parse("abc"), None);
    }

    #[test]
    fn sandbox_mac_and_link_local_follow_the_id() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        assert_eq!(id.sandbox_mac(), [0x02, 0x70, 0x0a, 0x1b, 0x2c, 0x3d]);
        assert_eq!(
            id.sandbox_link_local(),
            "fe80::70:aff:fe1b:2c3d"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
        // Locally administered, unicast.
        assert_eq!(SandboxId::random().sandbox_mac()[0] & 0x03, 0x02);
    }
}
