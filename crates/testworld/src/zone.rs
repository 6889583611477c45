//! The `.test` zone that the world's DNS server answers from: a builder that tests fill in,
//! and the JSON description that `scripts/worlddns.py` reads.
//!
//! Names are kept in the server's form: lower case, without the trailing dot. Record data is
//! not restricted to the documentation ranges on purpose: a test may want an answer that
//! points at 127.0.0.1 or 10.0.0.1 to see Portcullis refuse it. Such an answer sends no packet
//! by itself; whatever a test then connects to must still stay inside its namespaces.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::json;

/// Records of the world's authoritative DNS server, for `test.` and below.
///
/// ```
/// use portcullis_testworld::Zone;
/// use std::net::Ipv4Addr;
///
/// let zone = Zone::new()
///     .a("a.test", Ipv4Addr::new(198, 51, 100, 10), 60)
///     .aaaa("a.test", [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10], 60)
///     .cname("www.a.test", "a.test", 30)
///     .txt("a.test", "hello", 30)
///     .generated("gen.test", 5)
///     .truncated("a.test");
/// # let _ = zone;
/// ```
#[derive(Clone, Debug, Default)]
pub struct Zone {
    records: Vec<Record>,
    generated: Vec<(String, u32)>,
    truncated: Vec<String>,
    delayed: Vec<(String, u64)>,
    servfail: Vec<String>,
    garbage: Vec<String>,
}

#[derive(Clone, Debug)]
struct Record {
    name: String,
    rtype: &'static str,
    ttl: u32,
    data: String,
}

impl Zone {
    /// First address of the world that answers generated names (`198.51.100.20`).
    const GENERATED_V4_FIRST: u8 = 20;
    /// How many IPv4 addresses generated names cycle through (`.20` to `.219`).
    const GENERATED_V4_COUNT: u64 = 200;
    /// `2001:db8:1::/64`: generated names get `2001:db8:1::<K>`.
    const GENERATED_V6_BASE: u128 = 0x2001_0db8_0001_u128 << 80;

    /// An empty zone: every name under `.test` is NXDOMAIN (except `test.` itself, which has
    /// an SOA).
    pub fn new() -> Zone {
        Zone::default()
    }

    /// Adds an A record. Several records of one name and type make an RRset.
    pub fn a(self, name: &str, addr: impl Into<Ipv4Addr>, ttl: u32) -> Zone {
        self.record(name, "A", ttl, addr.into().to_string())
    }

    /// Adds an AAAA record.
    pub fn aaaa(self, name: &str, addr: impl Into<Ipv6Addr>, ttl: u32) -> Zone {
        self.record(name, "AAAA", ttl, addr.into().to_string())
    }

    /// Adds a CNAME. Chains are followed inside one answer (up to 16 links); a loop or a
    /// target outside `.test` ends the answer with the CNAMEs found so far, and a target that
    /// does not exist makes the answer NXDOMAIN (RFC 6604), as a real server does.
    pub fn cname(self, name: &str, target: &str, ttl: u32) -> Zone {
        let target = normalize(target);
        self.record(name, "CNAME", ttl, target)
    }

    /// Adds a TXT record (split into 255-byte strings on the wire when longer).
    pub fn txt(self, name: &str, text: &str, ttl: u32) -> Zone {
        self.record(name, "TXT", ttl, text.to_string())
    }

    /// Makes every name `n<K>.<suffix>` (K a decimal number below 2^64) exist, with A
    /// [`Zone::generated_v4`]`(K)` and AAAA [`Zone::generated_v6`]`(K)`, so a test can ask
    /// thousands of names that no resolver has cached.
    pub fn generated(mut self, suffix: &str, ttl: u32) -> Zone {
        self.generated.push((test_name(suffix), ttl));
        self
    }

    /// Answers queries for exactly `name` over UDP with the TC bit and no records; over TCP
    /// with the full answer.
    pub fn truncated(mut self, name: &str) -> Zone {
        self.truncated.push(test_name(name));
        self
    }

    /// Answers queries for exactly `name` as usual, but only `ms` milliseconds after they
    /// arrive (over UDP and TCP; other queries are not held up meanwhile): a slow upstream.
    pub fn delayed(mut self, name: &str, ms: u64) -> Zone {
        self.delayed.push((test_name(name), ms));
        self
    }

    /// Answers queries for exactly `name` with SERVFAIL and no records: a failing upstream.
    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.push(test_name(name));
        self
    }

    /// Answers queries for exactly `name` with garbage: over UDP a datagram of random bytes,
    /// then the real answer under a wrong message ID; over TCP a length-prefixed message of
    /// random bytes, then the connection closes. No valid answer to the query ever comes.
    pub fn garbage(mut self, name: &str) -> Zone {
        self.garbage.push(test_name(name));
        self
    }

    /// The IPv4 address of generated name `n<k>.<suffix>`: `198.51.100.<(k % 200) + 20>`.
    pub fn generated_v4(k: u64) -> Ipv4Addr {
        // The remainder is below 200, so the sum fits in a u8.
        let host = (k % Self::GENERATED_V4_COUNT) as u8 + Self::GENERATED_V4_FIRST;
        Ipv4Addr::new(198, 51, 100, host)
    }

    /// The IPv6 address of generated name `n<k>.<suffix>`: `2001:db8:1::<k in hex>`.
    pub fn generated_v6(k: u64) -> Ipv6Addr {
        Ipv6Addr::from(Self::GENERATED_V6_BASE + u128::from(k))
    }

    fn record(mut self, name: &str, rtype: &'static str, ttl: u32, data: String) -> Zone {
        self.records.push(Record {
            name: test_name(name),
            rtype,
            ttl,
            data,
        });
        self
    }

    /// The description that `worlddns.py` reads.
    pub(crate) fn to_json(&self) -> String {
        let records: Vec<_> = self
            .records
            .iter()
            .map(|r| json!({"name": r.name, "type": r.rtype, "ttl": r.ttl, "data": r.data}))
            .collect();
        let generated: Vec<_> = self
            .generated
            .iter()
            .map(|(suffix, ttl)| json!({"suffix": suffix, "ttl": ttl}))
            .collect();
        let delayed: serde_json::Map<_, _> = self
            .delayed
            .iter()
            .map(|(name, ms)| (name.clone(), json!(ms)))
            .collect();
        json!({
            "records": records,
            "generated": generated,
            "truncated": self.truncated,
            "delayed": delayed,
            "servfail": self.servfail,
            "garbage": self.garbage,
        })
        .to_string()
    }
}

/// Lower case, no trailing dot: the form the server compares and logs.
pub(crate) fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A name the zone may own: under `.test` (RFC 6761), without empty labels.
fn test_name(name: &str) -> String {
    let normalized = normalize(name);
    let well_formed = normalized
        .split('.')
        .all(|label| !label.is_empty() && label.len() <= 63)
        && !normalized.contains(char::is_whitespace);
    assert!(
        well_formed && (normalized == "test" || normalized.ends_with(".test")),
        "zone name {name:?}: the world's DNS only serves well-formed names under .test"
    );
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_addresses_follow_the_documented_formula() {
        assert_eq!(Zone::generated_v4(0), Ipv4Addr::new(198, 51, 100, 20));
        assert_eq!(Zone::generated_v4(199), Ipv4Addr::new(198, 51, 100, 219));
        assert_eq!(Zone::generated_v4(200), Ipv4Addr::new(198, 51, 100, 20));
        assert_eq!(
            Zone::generated_v6(0x3039),
            "2001:db8:1::3039"
                .parse::<Ipv6Addr>()
                .expect("valid address")
        );
        assert_eq!(
            Zone::generated_v6(u64::MAX),
            "2001:db8:1:0:ffff:ffff:ffff:ffff"
                .parse::<Ipv6Addr>()
                .expect("valid address")
        );
    }

    #[test]
    fn names_are_normalized_in_the_json() {
        let zone = Zone::new()
            .a("A.Test.", [198, 51, 100, 1], 5)
            .cname("c.test", "A.TEST.", 7)
            .generated("Gen.test", 3)
            .truncated("a.test")
            .delayed("Slow.test", 2500)
            .servfail("broken.test.")
            .garbage("noise.test");
        let value: serde_json::Value =
            serde_json::from_str(&zone.to_json()).expect("zone JSON parses");
        assert_eq!(value["records"][0]["name"], "a.test");
        assert_eq!(value["records"][0]["data"], "198.51.100.1");
        assert_eq!(value["records"][1]["data"], "a.test");
        assert_eq!(value["generated"][0]["suffix"], "gen.test");
        assert_eq!(value["truncated"][0], "a.test");
        assert_eq!(value["delayed"]["slow.test"], 2500);
        assert_eq!(value["servfail"][0], "broken.test");
        assert_eq!(value["garbage"][0], "noise.test");
    }

    #[test]
    #[should_panic(expected = "under .test")]
    fn names_outside_test_are_refused() {
        let _ = Zone::new().a("example.com", [198, 51, 100, 1], 5);
    }
}
