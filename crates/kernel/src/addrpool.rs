//! Choosing the addresses of a new sandbox: the first free block of each pool that overlaps
//! no address or route already present and no other live sandbox. Pure; tested without root.
//!
//! The first free block, not a random one: runs one after another then get the same
//! addresses, and the kernel derives a connection's initial sequence number and its TCP
//! timestamp offset from its source address. Masqueraded to the host's address, the next
//! run's connections then continue the last run's numbers, and a server still holding that
//! run's connections in TIME_WAIT on the same address and ports accepts the new ones. With a
//! new address each time, a fifth to a third of a busy client's connections met such a server
//! with a challenge ACK, a reset and a retransmitted SYN (docs/benchmarks.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::nft::ruleset::Addressing;
use crate::state::NetworkRecord;

/// Default pools for real use; tests and users override them (`--pool4`, `--pool6`).
pub const DEFAULT_POOL4: &str = "10.139.0.0/16";
pub const DEFAULT_POOL6: &str = "fd70:6f72:7463::/48";
/// Size of one sandbox's blocks: a /30 (host .1, sandbox .2) and a /64 (host ::1, sandbox ::2).
pub const BLOCK4: u8 = 30;
pub const BLOCK6: u8 = 64;

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Picks addressing for a sandbox: the first free block of each pool.
pub fn allocate(pool4: Ipv4Net, pool6: Ipv6Net, in_use: &[IpNet]) -> Option<Addressing> {
    let free = |net: IpNet| !in_use.iter().any(|u| overlaps(u, &net));
    let b4 = pool4
        .subnets(BLOCK4.max(pool4.prefix_len()))
        .ok()?
        .find(|b| free(IpNet::V4(*b)))?;
    let prefix6 = BLOCK6.max(pool6.prefix_len());
    let span = 1u128 << (prefix6 - pool6.prefix_len()).min(20);
    let b6 = (0..span)
        .map(|i| {
            let base = u128::from(pool6.network()) + (i << (128 - u32::from(prefix6)));
            Ipv6Net::new(Ipv6Addr::from(base), prefix6).expect("valid prefix")
        })
        .find(|b| free(IpNet::V6(*b)))?;
    let v4 = |off: u32| Ipv4Addr::from(u32::from(b4.network()) + off);
    let v6 = |off: u128| Ipv6Addr::from(u128::from(b6.network()) + off);
    Some(Addressing {
        host4: v4(1),
        sandbox4: v4(2),
        prefix4: b4.prefix_len(),
        host6: v6(1),
        sandbox6: v6(2),
        prefix6: b6.prefix_len(),
    })
}

/// Addressing of a sandbox on a named network: the gateways, and the lowest address of each
/// subnet after its gateway that no sandbox in `taken` holds (the IPv4 broadcast address
/// excluded), as a /32 and a /128.
pub fn allocate_on_network(net: &NetworkRecord, taken: &[Addressing]) -> Option<Addressing> {
    let s4 = net
        .subnet4
        .hosts()
        .filter(|h| *h != net.gateway4)
        .find(|h| !taken.iter().any(|t| t.sandbox4 == *h))?;
    let base6 = u128::from(net.gateway6);
    let last6 = u128::from(net.subnet6.broadcast());
    let s6 = (1..=1u128 << 20)
        .map(|k| base6.saturating_add(k))
        .take_while(|a| *a <= last6)
        .map(Ipv6Addr::from)
        .find(|a| !taken.iter().any(|t| t.sandbox6 == *a))?;
    Some(Addressing {
        host4: net.gateway4,
        sandbox4: s4,
        prefix4: 32,
        host6: net.gateway6,
        sandbox6: s6,
        prefix6: 128,
    })
}

/// A free block of `prefix` bits in `pool` that overlaps nothing in `in_use`, for a new
/// network's default subnet.
pub fn free_block(pool: IpNet, prefix: u8, in_use: &[IpNet]) -> Option<IpNet> {
    let prefix = prefix.max(pool.prefix_len());
    let mut blocks = pool.subnets(prefix).ok()?;
    blocks.find(|b| !in_use.iter().any(|u| overlaps(u, b)))
}

/// The prefixes a live sandbox holds, for `allocate`'s `in_use`.
pub fn prefixes_of(a: &Addressing) -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::V4(a.host4), a.prefix4)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(IpAddr::V4(a.host4))),
        IpNet::new(IpAddr::V6(a.host6), a.prefix6)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(IpAddr::V6(a.host6))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_addresses_are_the_lowest_free_after_the_gateway() {
        let net = NetworkRecord {
            name: crate::names::NetworkName::parse("n").unwrap(),
            bridge: "pc-n00000000".into(),
            subnet4: "203.0.113.192/30".parse().unwrap(),
            subnet6: "2001:db8:fffe:ff::/126".parse().unwrap(),
            gateway4: "203.0.113.193".parse().unwrap(),
            gateway6: "2001:db8:fffe:ff::1".parse().unwrap(),
        };
        let a = allocate_on_network(&net, &[]).unwrap();
        assert_eq!(a.sandbox4, "203.0.113.194".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            a.sandbox6,
            "2001:db8:fffe:ff::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!((a.prefix4, a.prefix6), (32, 128));
        // A /30 holds one sandbox: .195 is the broadcast address.
        assert!(allocate_on_network(&net, &[a]).is_none());
    }

    #[test]
    fn skips_blocks_in_use_and_fails_when_full() {
        let pool4: Ipv4Net = "203.0.113.128/29".parse().unwrap();
        let pool6: Ipv6Net = "2001:db8:fffe::/63".parse().unwrap();
        let used: Vec<IpNet> = vec![
            "203.0.113.128/30".parse().unwrap(),
            "2001:db8:fffe::/64".parse().unwrap(),
        ];
        let a = allocate(pool4, pool6, &used).unwrap();
        assert_eq!(a.host4, "203.0.113.133".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.sandbox4, "203.0.113.134".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            a.sandbox6,
            "2001:db8:fffe:1::2".parse::<Ipv6Addr>().unwrap()
        );
        let mut used = used;
        used.extend(prefixes_of(&a));
        assert!(allocate(pool4, pool6, &used).is_none());
        // A wide route covering the pool (not a default route) makes it unusable too.
        assert!(allocate(pool4, pool6, &["203.0.113.0/24".parse().unwrap()]).is_none());
    }
}
