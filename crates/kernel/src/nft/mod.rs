//! nftables: the per-sandbox ruleset (`ruleset`), applying and deleting it with the `nft`
//! program (`apply`), and writing set elements over netlink on the DNS hot path (`sets`).
//!
//! Rules change rarely and must be atomic and readable, so they go through `nft -f -` as one
//! transaction. Set elements change once per DNS answer and must be fast and acknowledged, so
//! they go over a persistent netlink socket (see ../../../../docs/architecture.md).

pub mod apply;
pub mod ruleset;
pub mod sets;
