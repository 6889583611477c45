//! The anti-spoofing table of one sandbox, as `nft -f` text. Pure: no I/O, tested without root.
//!
//! The `inet` family sees IPv4 and IPv6 only, so the first line of defence is a `netdev` table
//! (`netdev portcullis_<id>`, named like the `inet` one) with an ingress chain on the host side
//! of the veth pair: every frame the sandbox sends passes it before anything else in the host.
//! It drops and counts (counter `spoofed`), in the spirit of LXD's `security.mac_filtering`,
//! `ipv4_filtering` and `ipv6_filtering`:
//!
//! - frames whose source MAC is not the sandbox's (Portcullis sets it, see
//!   `SandboxId::sandbox_mac`), and every ethertype but IPv4, IPv6 and ARP: 802.1Q and QinQ
//!   tags, 802.3/LLC, anything else;
//! - ARP whose sender MAC or sender IPv4 is not the sandbox's (gratuitous ARP and replies for
//!   another address), or that is not Ethernet/IPv4;
//! - IPv4 from another source (0.0.0.0 too: the sandbox has a static address and no DHCP
//!   client), DHCP server messages (UDP source port 67) and ICMP redirects;
//! - IPv6 from another source than its address and its link-local address (EUI-64 of its
//!   MAC). `::` is allowed only for what the kernel sends before its link-local address is
//!   usable: MLD reports, and duplicate address detection (a neighbour solicitation for one
//!   of its own addresses, with no option or the DAD nonce only);
//! - router advertisements, redirects (ICMPv6 137) and DHCPv6 server messages (UDP source
//!   port 547);
//! - neighbour discovery about anyone else: an advertisement must be for one of its own
//!   addresses, and a link-layer address option (source in a solicitation, target in an
//!   advertisement) must carry its own MAC. Neighbour discovery must come without extension
//!   headers and with at most that one option (Linux sends no other), so no second option
//!   can hide another MAC.
//!
//! Everything else passes on to the `inet` table, whose egress and host-input chains still
//! check the source address of what is forwarded or delivered (the second line).

use std::fmt::Write as _;
use std::net::Ipv6Addr;

use crate::names::{COUNTER_SPOOFED, SandboxId};
use crate::nft::ruleset::Addressing;

/// `aa:bb:cc:dd:ee:ff`, as nft writes a MAC address.
fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The 48 bits of a MAC as one integer, for raw payload matches.
fn mac_int(mac: &[u8; 6]) -> u64 {
    mac.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// An IPv6 address as a 128-bit integer, for raw payload matches (nft has no keyword for the
/// target address of neighbour discovery).
fn addr_int(a: &Ipv6Addr) -> String {
    format!("{:#034x}", u128::from(*a))
}

/// The `nft -f` script creating sandbox `id`'s anti-spoofing table. Its ingress chain is bound
/// to the host-side link, which must exist when the script is applied.
pub fn antispoof_ruleset(id: &SandboxId, a: &Addressing) -> String {
    let table = id.table();
    let ifname = id.host_ifname();
    let mac = id.sandbox_mac();
    let ll = id.sandbox_link_local();
    let own6 = format!("{}, {}", addr_int(&a.sandbox6), addr_int(&ll));
    let mut s = String::with_capacity(4096);
    let _ = write!(
        s,
        r#"table netdev {table} {{
	counter {c} {{ }}

	# Every frame the sandbox sends: its own MAC, and IPv4, IPv6 or ARP only (no VLAN tags).
	chain ingress {{
		type filter hook ingress device "{ifname}" priority filter; policy accept;
		ether saddr != {mac} counter name {c} drop
		ether type vmap {{ ip : jump from_ipv4, ip6 : jump from_ipv6, arp : jump from_arp }}
		counter name {c} drop
	}}

	# ARP only about itself: Ethernet/IPv4, sender MAC and sender address its own.
	chain from_arp {{
		arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether {mac} arp saddr ip {s4} accept
		counter name {c} drop
	}}

	chain from_ipv4 {{
		ip saddr != {s4} counter name {c} drop
		udp sport 67 counter name {c} drop
		icmp type redirect counter name {c} drop
		accept
	}}

	chain from_ipv6 {{
		ip6 saddr :: jump unspecified6
		ip6 saddr != {{ {s6}, {ll} }} counter name {c} drop
		icmpv6 type {{ nd-router-advert, nd-redirect }} counter name {c} drop
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} jump ndp
		udp sport 547 counter name {c} drop
		accept
	}}

	# From ::, before its link-local address is usable: MLD reports, and duplicate address
	# detection of its own addresses (no option, or the nonce option only).
	chain unspecified6 {{
		icmpv6 type {{ mld-listener-report, mld2-listener-report }} accept
		ip6 nexthdr ipv6-icmp ip6 length 24 icmpv6 type nd-neighbor-solicit @th,64,128 {{ {own6} }} accept
		ip6 nexthdr ipv6-icmp ip6 length 32 icmpv6 type nd-neighbor-solicit @th,64,128 {{ {own6} }} @th,192,16 0x0e01 accept
		counter name {c} drop
	}}

	# Neighbour discovery only about itself: no extension headers, at most one option, and a
	# link-layer option carries its own MAC; an advertisement is for its own addresses only.
	chain ndp {{
		ip6 nexthdr != ipv6-icmp counter name {c} drop
		icmpv6 type nd-neighbor-solicit ip6 length 24 accept
		icmpv6 type nd-neighbor-solicit ip6 length 32 @th,192,64 {sll:#018x} accept
		icmpv6 type nd-neighbor-advert ip6 length 24 @th,64,128 {{ {own6} }} accept
		icmpv6 type nd-neighbor-advert ip6 length 32 @th,64,128 {{ {own6} }} @th,192,64 {tll:#018x} accept
		counter name {c} drop
	}}
}}
"#,
        c = COUNTER_SPOOFED,
        mac = mac_text(&mac),
        s4 = a.sandbox4,
        s6 = a.sandbox6,
        // Option type (1 source, 2 target link-layer address), length 1 (8 bytes), the MAC.
        sll = (0x0101u64 << 48) | mac_int(&mac),
        tll = (0x0201u64 << 48) | mac_int(&mac),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addressing() -> Addressing {
        Addressing {
            host4: "203.0.113.129".parse().unwrap(),
            sandbox4: "203.0.113.130".parse().unwrap(),
            prefix4: 30,
            host6: "2001:db8:fffe::1".parse().unwrap(),
            sandbox6: "2001:db8:fffe::2".parse().unwrap(),
            prefix6: 64,
        }
    }

    fn text() -> String {
        antispoof_ruleset(&SandboxId::parse("0a1b2c3d").unwrap(), &addressing())
    }

    fn chain<'a>(text: &'a str, name: &str) -> &'a str {
        let start = text.find(&format!("\tchain {name} {{")).unwrap();
        let end = text[start..].find("\n\t}\n").unwrap();
        &text[start..start + end]
    }

    #[test]
    fn one_netdev_table_named_after_the_sandbox_on_its_host_link() {
        let t = text();
        assert!(t.starts_with("table netdev portcullis_0a1b2c3d {"));
        assert!(t.contains("counter spoofed { }"));
        assert!(t.contains(
            r#"type filter hook ingress device "pc-0a1b2c3d-h" priority filter; policy accept;"#
        ));
    }

    #[test]
    fn every_chain_ends_in_a_counted_drop_or_an_explicit_accept() {
        let t = text();
        for name in ["ingress", "from_arp", "unspecified6", "ndp"] {
            assert!(
                chain(&t, name).ends_with("counter name spoofed drop"),
                "{name}"
            );
        }
        // A regular chain that fell off its end would return to `ingress`, whose next rule
        // is the drop: these two end in an explicit accept instead.
        for name in ["from_ipv4", "from_ipv6"] {
            assert!(chain(&t, name).ends_with("\t\taccept"), "{name}");
        }
        // Every drop is counted.
        assert_eq!(
            t.matches(" drop\n").count(),
            t.matches("counter name spoofed drop\n").count()
        );
    }

    #[test]
    fn frames_must_carry_the_sandbox_mac_and_a_known_ethertype() {
        let t = text();
        let ingress = chain(&t, "ingress");
        let mac = ingress
            .find("ether saddr != 02:70:0a:1b:2c:3d counter name spoofed drop")
            .unwrap();
        let vmap = ingress
            .find("ether type vmap { ip : jump from_ipv4, ip6 : jump from_ipv6, arp : jump from_arp }")
            .unwrap();
        assert!(mac < vmap);
        // 802.1Q (0x8100) and QinQ (0x88a8) are not in the map: they meet the final drop.
        assert!(!ingress.contains("vlan") && !ingress.contains("8021"));
    }

    #[test]
    fn arp_only_from_its_own_mac_and_address() {
        let t = text();
        assert!(
            chain(&t, "from_arp")
                .contains("arp saddr ether 02:70:0a:1b:2c:3d arp saddr ip 203.0.113.130 accept")
        );
    }

    #[test]
    fn sources_and_server_messages() {
        let t = text();
        let v4 = chain(&t, "from_ipv4");
        assert!(v4.contains("ip saddr != 203.0.113.130 counter name spoofed drop"));
        assert!(v4.contains("udp sport 67 counter name spoofed drop"));
        assert!(v4.contains("icmp type redirect counter name spoofed drop"));
        let v6 = chain(&t, "from_ipv6");
        let unspec = v6.find("ip6 saddr :: jump unspecified6").unwrap();
        let spoof = v6
            .find("ip6 saddr != { 2001:db8:fffe::2, fe80::70:aff:fe1b:2c3d } counter name spoofed drop")
            .unwrap();
        let ra = v6
            .find("icmpv6 type { nd-router-advert, nd-redirect } counter name spoofed drop")
            .unwrap();
        let ndp = v6.find("jump ndp").unwrap();
        assert!(unspec < spoof && spoof < ra && ra < ndp);
        assert!(v6.contains("udp sport 547 counter name spoofed drop"));
    }

    #[test]
    fn neighbour_discovery_only_about_itself() {
        let t = text();
        let own = "{ 0x20010db8fffe00000000000000000002, 0xfe8000000000000000700afffe1b2c3d }";
        let ndp = chain(&t, "ndp");
        assert!(ndp.contains("@th,192,64 0x010102700a1b2c3d accept"));
        assert!(ndp.contains(&format!(
            "nd-neighbor-advert ip6 length 32 @th,64,128 {own} @th,192,64 0x020102700a1b2c3d accept"
        )));
        assert!(ndp.contains(&format!(
            "nd-neighbor-advert ip6 length 24 @th,64,128 {own} accept"
        )));
        let unspec = chain(&t, "unspecified6");
        assert_eq!(unspec.matches(&format!("@th,64,128 {own}")).count(), 2);
        assert!(unspec.contains("@th,192,16 0x0e01 accept"));
    }
}
