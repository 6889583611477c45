//! Counters in the world namespace that prove what arrived from the uplink: the far-side
//! evidence that TESTNET.md asks for ("the world saw no packet from the sandbox").
//!
//! Table `inet testworld` hooks prerouting at priority raw (-300), before conntrack and
//! before any socket lookup, so it counts every packet that comes in on the link from the
//! uplink, the first SYN included, whether or not anything listens. Dynamic sets with a
//! counter per element count packets by destination address, by source address, and by
//! destination address . protocol . port for TCP and UDP. Nothing is excluded: DNS queries
//! to .53 are counted too, and so would be the kernels' own chatter, which the world keeps
//! off the link (permanent neighbours, MLD reports done before the table exists) so that an
//! idle uplink leaves every counter still. Still, "nothing arrived" is best asserted per
//! address, or from the sandbox's source addresses, with [`crate::World::packets_from`].

use std::net::IpAddr;
use std::path::Path;

use serde_json::Value;

use crate::exec::{netns_exec, run};

const TABLE: &str = "testworld";
const TOTAL: &str = "total";
const DST4: &str = "dst4";
const DST6: &str = "dst6";
const SRC4: &str = "src4";
const SRC6: &str = "src6";
const PORT4: &str = "port4";
const PORT6: &str = "port6";
const SYN4: &str = "syn4";
const SYN6: &str = "syn6";
/// Elements per set; a full set stops counting new addresses (old ones go on counting).
const SET_SIZE: u32 = 65536;

/// Loads the counting table into namespace `ns`, counting packets that arrive on `iface`.
pub(crate) fn setup(ns: &str, iface: &str, run_dir: &Path) {
    let path = run_dir.join("counters.nft");
    std::fs::write(&path, ruleset(iface))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    run(netns_exec(ns, "nft").arg("-f").arg(&path));
}

fn ruleset(iface: &str) -> String {
    let set = |name: &str, key: &str| {
        format!("  set {name} {{ type {key}; size {SET_SIZE}; flags dynamic; counter; }}\n")
    };
    let mut text = format!("table inet {TABLE} {{\n  counter {TOTAL} {{ }}\n");
    text += &set(DST4, "ipv4_addr");
    text += &set(DST6, "ipv6_addr");
    text += &set(SRC4, "ipv4_addr");
    text += &set(SRC6, "ipv6_addr");
    text += &set(PORT4, "ipv4_addr . inet_proto . inet_service");
    text += &set(PORT6, "ipv6_addr . inet_proto . inet_service");
    text += &set(SYN4, "ipv4_addr . inet_service");
    text += &set(SYN6, "ipv6_addr . inet_service");
    text += &format!(
        "  chain count {{
    type filter hook prerouting priority raw; policy accept;
    iifname != \"{iface}\" return
    # The uplink kernel's own link-local chatter (MLD reports, router solicitations) is never
    # forwarded, so it cannot carry a sandbox's packet: it is not counted.
    icmpv6 type {{ mld-listener-report, mld2-listener-report, nd-router-solicit }} return
    counter name \"{TOTAL}\"
    update @{DST4} {{ ip daddr }}
    update @{DST6} {{ ip6 daddr }}
    update @{SRC4} {{ ip saddr }}
    update @{SRC6} {{ ip6 saddr }}
    meta l4proto {{ tcp, udp }} update @{PORT4} {{ ip daddr . meta l4proto . th dport }}
    meta l4proto {{ tcp, udp }} update @{PORT6} {{ ip6 daddr . meta l4proto . th dport }}
    tcp flags & (syn | ack) == syn update @{SYN4} {{ ip daddr . tcp dport }}
    tcp flags & (syn | ack) == syn update @{SYN6} {{ ip6 daddr . tcp dport }}
  }}
}}
"
    );
    text
}

/// Packets that arrived for destination `ip`.
pub(crate) fn packets_to(ns: &str, ip: IpAddr) -> u64 {
    let set = if ip.is_ipv4() { DST4 } else { DST6 };
    sum_matching(ns, set, |val| address_is(val, ip))
}

/// Packets that arrived from source `ip`.
pub(crate) fn packets_from(ns: &str, ip: IpAddr) -> u64 {
    let set = if ip.is_ipv4() { SRC4 } else { SRC6 };
    sum_matching(ns, set, |val| address_is(val, ip))
}

/// TCP or UDP packets that arrived for `ip` port `port`.
pub(crate) fn packets_to_port(ns: &str, ip: IpAddr, proto: &str, port: u16) -> u64 {
    let number = match proto {
        "tcp" => 6,
        "udp" => 17,
        other => {
            panic!("packets_to_port: protocol {other:?} is not counted; use \"tcp\" or \"udp\"")
        }
    };
    let set = if ip.is_ipv4() { PORT4 } else { PORT6 };
    sum_matching(ns, set, |val| {
        let Some([addr, p, dport]) = val["concat"].as_array().map(Vec::as_slice) else {
            return false;
        };
        // nft prints the protocol by name where it knows it, by number otherwise.
        let proto_matches = p.as_str() == Some(proto) || p.as_u64() == Some(number);
        address_is(addr, ip) && proto_matches && dport.as_u64() == Some(u64::from(port))
    })
}

/// TCP SYNs (connection attempts, retransmissions included) that arrived for `ip` port `port`.
pub(crate) fn syns_to(ns: &str, ip: IpAddr, port: u16) -> u64 {
    let set = if ip.is_ipv4() { SYN4 } else { SYN6 };
    sum_matching(ns, set, |val| {
        let Some([addr, dport]) = val["concat"].as_array().map(Vec::as_slice) else {
            return false;
        };
        address_is(addr, ip) && dport.as_u64() == Some(u64::from(port))
    })
}

/// Every packet that arrived from the uplink.
pub(crate) fn total(ns: &str) -> u64 {
    let listing = list(ns, &["counter", "inet", TABLE, TOTAL]);
    objects(&listing, "counter")
        .find_map(|counter| counter["packets"].as_u64())
        .unwrap_or_else(|| panic!("no packet count in `nft -j list counter`: {listing}"))
}

fn address_is(val: &Value, ip: IpAddr) -> bool {
    val.as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(ip)
}

fn sum_matching(ns: &str, set: &str, matches: impl Fn(&Value) -> bool) -> u64 {
    let listing = list(ns, &["set", "inet", TABLE, set]);
    let set_object = objects(&listing, "set")
        .next()
        .unwrap_or_else(|| panic!("no set in `nft -j list set {set}`: {listing}"));
    let Some(elements) = set_object["elem"].as_array() else {
        return 0; // an empty set has no "elem" key
    };
    elements
        .iter()
        .map(|element| &element["elem"])
        .filter(|element| matches(&element["val"]))
        .filter_map(|element| element["counter"]["packets"].as_u64())
        .sum()
}

fn list(ns: &str, what: &[&str]) -> Value {
    let json = run(netns_exec(ns, "nft").args(["-j", "list"]).args(what));
    serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`nft -j list` gave bad JSON ({e}): {json}"))
}

/// The objects of kind `kind` ("set", "counter") in an `nft -j` listing.
fn objects<'a>(listing: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |object| object.get(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_counts_only_the_uplink_link() {
        let text = ruleset("uplink0");
        assert!(text.contains("iifname != \"uplink0\" return"));
        assert!(text.contains("priority raw"));
        assert_eq!(text.matches("flags dynamic; counter;").count(), 8);
    }

    #[test]
    fn objects_finds_sets_in_a_listing() {
        let listing: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "dst4", "elem": [
                {"elem": {"val": "198.51.100.7", "counter": {"packets": 2, "bytes": 168}}}]}}]}"#,
        )
        .expect("sample listing parses");
        let set = objects(&listing, "set").next().expect("one set");
        assert_eq!(set["name"], "dst4");
        let element = &set["elem"][0]["elem"];
        assert!(address_is(
            &element["val"],
            "198.51.100.7".parse().expect("ip")
        ));
        assert_eq!(element["counter"]["packets"], 2);
    }
}
