//! nftables: the per-sandbox ruleset (`ruleset`), applying and deleting it with the `nft`
//! program (`apply`), and writing set elements over netlink on the DNS hot path (`sets`).
//!
//! Rules change rarely and must be atomic and readable, so they go through `nft -f -` as one
//! transaction. Set elements change once per DNS answer and must be fast and acknowledged, so
//! they go over a persistent netlink socket (see ../../../../docs/architecture.md).
//! `host_ruleset` is the table of a host-mode run (`run --host-network`).
//! `antispoof` is the per-sandbox `netdev` table that filters frames at the host-side link.

pub mod antispoof;
pub mod apply;
pub mod host_ruleset;
pub mod ruleset;
pub mod sets;

/// The nftables families Portcullis makes tables in: `inet` for the per-sandbox data plane
/// and the guard, `netdev` for the per-sandbox anti-spoofing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet,
    Netdev,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Inet, Family::Netdev];

    /// The family's name in `nft` syntax.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Netdev => "netdev",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
