//! The nftables ruleset of one sandbox, as `nft -f` text. Pure: no I/O, tested without root.
//!
//! One table per sandbox (`inet portcullis_<id>`) in the invoking namespace holds everything:
//! the dynamic allow sets, the DNS redirect to the relay, the egress filter, the host-input
//! guard and the masquerade. Deleting the table removes the sandbox's whole data plane at once.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use portcullis_policy::Protocol;

use crate::names::{
    COUNTER_BLOCKED, COUNTER_OPENED4, COUNTER_OPENED6, GLOBAL_TABLE, IF_PREFIX, SET_ALLOW4,
    SET_ALLOW4_PORT, SET_ALLOW6, SET_ALLOW6_PORT, SandboxId,
};

/// Maximum elements per dynamic set (the benchmark fills 1M).
pub const SET_SIZE: u32 = 1 << 21;
/// Blocked packets reported to userspace per second and sandbox; the counter stays exact.
pub const LOG_RATE_PER_SECOND: u32 = 200;
/// Blocked packets reported at once before the rate applies. nft's default burst is 5
/// packets: a CMD that tried a handful of destinations within a few milliseconds had all but
/// the first five missing from the report.
pub const LOG_BURST: u32 = LOG_RATE_PER_SECOND;

/// The point-to-point addressing of one sandbox's veth pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addressing {
    pub host4: Ipv4Addr,
    pub sandbox4: Ipv4Addr,
    pub prefix4: u8,
    pub host6: Ipv6Addr,
    pub sandbox6: Ipv6Addr,
    pub prefix6: u8,
}

/// Ports the relay listens on, on the host side addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPorts {
    pub udp4: u16,
    pub tcp4: u16,
    pub udp6: u16,
    pub tcp6: u16,
}

/// A destination allowed by address rather than by name (a CIDR rule of the policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAllow {
    pub net: IpNet,
    /// Empty: every port and protocol.
    pub ports: Vec<(Protocol, u16)>,
}

/// A port of the host published to a port of the sandbox (`--publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// The host address it listens on; `None`: every address of the host, loopback included.
    pub host_addr: Option<IpAddr>,
    pub host_port: u16,
    pub sandbox_port: u16,
    pub protocol: Protocol,
}

impl Publish {
    /// Whether this applies to IPv4 (and IPv6) traffic.
    fn v4(&self) -> bool {
        !matches!(self.host_addr, Some(IpAddr::V6(_)))
    }
    fn v6(&self) -> bool {
        !matches!(self.host_addr, Some(IpAddr::V4(_)))
    }
    /// Whether connections to the host's IPv4 loopback reach it.
    pub fn from_loopback4(&self) -> bool {
        match self.host_addr {
            None => true,
            Some(IpAddr::V4(a)) => a.is_loopback(),
            Some(IpAddr::V6(_)) => false,
        }
    }
}

/// Everything the ruleset of one sandbox depends on.
#[derive(Debug, Clone)]
pub struct SandboxRules<'a> {
    pub id: &'a SandboxId,
    pub addressing: &'a Addressing,
    pub relay: RelayPorts,
    pub statics: &'a [StaticAllow],
    pub nflog_group: u16,
    /// `learn`: egress is open, and the first packet of every new flow is logged, without a
    /// rate limit, instead of checked against the sets.
    pub learn: bool,
    /// Ports of the host published to the sandbox.
    pub publish: &'a [Publish],
    /// The bridge of the named network the sandbox is attached to: its traffic is then
    /// recognised by that bridge and its own addresses instead of by its own link.
    pub bridge: Option<&'a str>,
}

/// The conntrack mark bit a learning sandbox sets on each flow it has logged, so that a
/// retransmitted first packet (a second SYN) is not logged as another flow. Only this bit is
/// touched.
pub const LEARN_CT_BIT: u32 = 0x0010_0000;

/// The `nft -f` script creating the sandbox's table. Adding it is one atomic transaction.
pub fn sandbox_ruleset(r: &SandboxRules<'_>) -> String {
    let table = r.id.table();
    let ifname = r.id.host_ifname();
    let a = r.addressing;
    let p = r.relay;
    // On a network, the sandbox's packets enter on the bridge; anti-spoofing at its port
    // guarantees their source addresses, which tell it from the other sandboxes there.
    let dev = r.bridge.map_or_else(|| ifname.clone(), str::to_owned);
    let ll = r.id.sandbox_link_local();
    let (sel4, sel6) = match r.bridge {
        Some(_) => (
            format!(" ip saddr {}", a.sandbox4),
            format!(" ip6 saddr {}", a.sandbox6),
        ),
        None => (String::new(), String::new()),
    };
    let others_in = match r.bridge {
        Some(_) => format!(
            "\t\t# Another sandbox of the network: its own table decides.\n\
             \t\tmeta nfproto ipv4 ip saddr != {s4} return\n\
             \t\tmeta nfproto ipv6 ip6 saddr != {{ {s6}, {ll} }} return\n",
            s4 = a.sandbox4,
            s6 = a.sandbox6,
        ),
        None => String::new(),
    };
    let others_out = match r.bridge {
        Some(_) => format!(
            "\t\tmeta nfproto ipv4 ip daddr != {s4} return\n\
             \t\tmeta nfproto ipv6 ip6 daddr != {{ {s6}, {ll} }} return\n",
            s4 = a.sandbox4,
            s6 = a.sandbox6,
        ),
        None => String::new(),
    };
    let forward = match r.bridge {
        None => format!(
            "\t\tiifname \"{ifname}\" jump egress\n\
             \t\toifname \"{ifname}\" ct state established,related accept\n\
             {publish}\t\toifname \"{ifname}\" counter name {COUNTER_BLOCKED} drop\n",
            publish = publish_accepts(r),
        ),
        // Towards the sandbox: replies, and new flows from another sandbox of the network,
        // which that sandbox's own egress chain has already allowed (a drop there is final).
        Some(br) => format!(
            "\t\tiifname \"{br}\"{sel4} jump egress\n\
             \t\tiifname \"{br}\"{sel6} jump egress\n\
             \t\toifname \"{br}\" ip daddr {s4} ct state established,related accept\n\
             \t\toifname \"{br}\" ip6 daddr {s6} ct state established,related accept\n\
             \t\toifname \"{br}\" iifname \"{br}\" ip daddr {s4} accept\n\
             \t\toifname \"{br}\" iifname \"{br}\" ip6 daddr {s6} accept\n\
             {publish}\t\toifname \"{br}\" ip daddr {s4} counter name {COUNTER_BLOCKED} drop\n\
             \t\toifname \"{br}\" ip6 daddr {s6} counter name {COUNTER_BLOCKED} drop\n",
            s4 = a.sandbox4,
            s6 = a.sandbox6,
            publish = publish_accepts(r),
        ),
    };
    let mut s = String::with_capacity(4096);
    let _ = write!(
        s,
        r#"table inet {table} {{
{sets}	counter {COUNTER_OPENED4} {{ }}
	counter {COUNTER_OPENED6} {{ }}

	# Every DNS packet of the sandbox, whatever its destination, goes to the relay.
	chain dns_redirect {{
		type nat hook prerouting priority dstnat - 10; policy accept;
		iifname "{dev}"{sel4} meta nfproto ipv4 udp dport 53 dnat ip to {h4}:{u4}
		iifname "{dev}"{sel4} meta nfproto ipv4 tcp dport 53 dnat ip to {h4}:{t4}
		iifname "{dev}"{sel6} meta nfproto ipv6 udp dport 53 dnat ip6 to [{h6}]:{u6}
		iifname "{dev}"{sel6} meta nfproto ipv6 tcp dport 53 dnat ip6 to [{h6}]:{t6}
	}}

	# From the sandbox, the host accepts the relay's ports and neighbour discovery only.
	chain host_input {{
		type filter hook input priority filter; policy accept;
		iifname != "{dev}" return
		# The sandbox kernel's own link chatter (router solicitations, MLD reports; CMD has no
		# raw sockets to send them) is no flow of CMD's: dropped without counting or logging.
		icmpv6 type {{ nd-router-solicit, mld-listener-report, mld2-listener-report }} drop
{others_in}		# New flows are counted: a run that started none left no conntrack entry behind.
		ct state new meta nfproto ipv4 counter name {COUNTER_OPENED4}
		ct state new meta nfproto ipv6 counter name {COUNTER_OPENED6}
		meta nfproto ipv4 ip saddr != {s4} counter name {COUNTER_BLOCKED} drop
		meta nfproto ipv6 ip6 saddr != {{ {s6}, fe80::/10 }} counter name {COUNTER_BLOCKED} drop
		ct state established,related accept
		ip daddr {h4} udp dport {u4} accept
		ip daddr {h4} tcp dport {t4} accept
		ip6 daddr {h6} udp dport {u6} accept
		ip6 daddr {h6} tcp dport {t6} accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
{host_log}		counter name {COUNTER_BLOCKED} drop
	}}

	chain forward {{
		type filter hook forward priority filter; policy accept;
{forward}	}}

	# From the host itself, the sandbox takes replies, neighbour discovery and published
	# ports only. Nothing here is CMD's doing: the drops are not counted as blocked.
	chain host_output {{
		type filter hook output priority filter; policy accept;
		oifname != "{dev}" return
{others_out}		ct state established,related accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
{publish_forward}		counter drop
	}}
{publish_nat}
	# Egress: replies, then what DNS answers and CIDR rules opened; the rest is logged and dropped.
	# Running flows are accepted first: the one rule most packets meet.
	chain egress {{
		ct state established,related accept
		ct state new meta nfproto ipv4 counter name {COUNTER_OPENED4}
		ct state new meta nfproto ipv6 counter name {COUNTER_OPENED6}
		meta nfproto ipv4 ip saddr != {s4} counter name {COUNTER_BLOCKED} drop
		meta nfproto ipv6 ip6 saddr != {s6} counter name {COUNTER_BLOCKED} drop
{learn}		ip daddr @{SET_ALLOW4} accept
		ip6 daddr @{SET_ALLOW6} accept
		meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @{SET_ALLOW4_PORT} accept
		meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport @{SET_ALLOW6_PORT} accept
"#,
        h4 = a.host4,
        h6 = a.host6,
        s4 = a.sandbox4,
        s6 = a.sandbox6,
        u4 = p.udp4,
        t4 = p.tcp4,
        u6 = p.udp6,
        t6 = p.tcp6,
        publish_forward = publish_accepts(r),
        publish_nat = publish_nat(r),
        // A learning sandbox's group carries its flows only: what the host drops is no
        // destination a policy could allow.
        host_log = if r.learn {
            String::new()
        } else {
            format!(
                "\t\tlimit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets log group {}\n",
                r.nflog_group
            )
        },
        sets = set_declarations(),
        learn = if r.learn {
            format!(
                "\t\t# Learning: every new flow is logged once, then let through.\n\
                 \t\tct mark and {LEARN_CT_BIT:#x} == 0 ct mark set ct mark or {LEARN_CT_BIT:#x} log group {g}\n\
                 \t\taccept\n",
                g = r.nflog_group
            )
        } else {
            String::new()
        },
    );
    s.push_str(&static_accepts(r.statics));
    let _ = write!(
        s,
        r#"		limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets log group {g}
		counter name {COUNTER_BLOCKED} drop
	}}

	chain source_nat {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "{dev}" ip saddr {s4} masquerade
		oifname != "{dev}" ip6 saddr {s6} masquerade
{loopback_nat}	}}
}}
"#,
        // A connection from the host's 127.0.0.1 to a published port leaves with the host
        // side's address: the sandbox could not answer 127.0.0.1.
        loopback_nat = if r.publish.iter().any(Publish::from_loopback4) {
            match r.bridge {
                None => format!("\t\toifname \"{ifname}\" ip saddr 127.0.0.0/8 masquerade\n"),
                Some(br) => format!(
                    "\t\toifname \"{br}\" ip saddr 127.0.0.0/8 ip daddr {} masquerade\n",
                    a.sandbox4
                ),
            }
        } else {
            String::new()
        },
        g = r.nflog_group,
        s4 = a.sandbox4,
        s6 = a.sandbox6,
    );
    s
}

/// A script that replaces the rules of every chain of `script` (a `sandbox_ruleset`) in the
/// live table `table`, in one transaction: each chain is flushed and filled again, while the
/// sets keep their elements and the connections their conntrack entries. No packet ever sees
/// a chain half written.
pub fn replace_chains(script: &str, table: &str) -> String {
    let mut s = String::new();
    for line in script.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("chain ")
            && let Some(name) = rest.strip_suffix(" {")
        {
            let _ = writeln!(s, "flush chain inet {table} {name}");
        }
    }
    s.push_str(script);
    s
}

/// The dynamic allow sets the relay writes and the `blocked` counter: the same in a
/// sandbox's table and in a host-mode run's.
pub(crate) fn set_declarations() -> String {
    format!(
        "\tset {SET_ALLOW4} {{ type ipv4_addr; flags timeout; size {SET_SIZE}; }}\n\
         \tset {SET_ALLOW6} {{ type ipv6_addr; flags timeout; size {SET_SIZE}; }}\n\
         \tset {SET_ALLOW4_PORT} {{ type ipv4_addr . inet_proto . inet_service; flags timeout; size {SET_SIZE}; }}\n\
         \tset {SET_ALLOW6_PORT} {{ type ipv6_addr . inet_proto . inet_service; flags timeout; size {SET_SIZE}; }}\n\
         \tcounter {COUNTER_BLOCKED} {{ }}\n"
    )
}

/// `accept` rules for the destinations the policy's CIDR rules allow.
pub(crate) fn static_accepts(statics: &[StaticAllow]) -> String {
    let mut s = String::new();
    for st in statics {
        let family = match st.net {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        if st.ports.is_empty() {
            let _ = writeln!(s, "\t\t{family} daddr {} accept", st.net);
        }
        for (proto, port) in &st.ports {
            let _ = writeln!(
                s,
                "\t\t{family} daddr {} {proto} dport {port} accept",
                st.net
            );
        }
    }
    s
}

/// `accept` rules for connections DNATed to a published port of the sandbox.
fn publish_accepts(r: &SandboxRules<'_>) -> String {
    // On a network, the bridge; the destination address names the sandbox.
    let ifname = r.bridge.map_or_else(|| r.id.host_ifname(), str::to_owned);
    let a = r.addressing;
    let mut s = String::new();
    for p in r.publish {
        let proto = p.protocol;
        let port = p.sandbox_port;
        if p.v4() {
            let _ = writeln!(
                s,
                "\t\toifname \"{ifname}\" ct status dnat ip daddr {} {proto} dport {port} accept",
                a.sandbox4
            );
        }
        if p.v6() {
            let _ = writeln!(
                s,
                "\t\toifname \"{ifname}\" ct status dnat ip6 daddr {} {proto} dport {port} accept",
                a.sandbox6
            );
        }
    }
    s
}

/// The DNAT chains of `--publish`: `publish_in` for connections arriving from elsewhere
/// (prerouting), `publish_local` for those the host itself makes (output: DNAT in prerouting
/// never sees them), to its own addresses and, for IPv4, its loopback.
fn publish_nat(r: &SandboxRules<'_>) -> String {
    if r.publish.is_empty() {
        return String::new();
    }
    let a = r.addressing;
    let mut rules = String::new();
    // Loopback destinations exist only for the host's own connections (output).
    let mut local = String::new();
    for p in r.publish {
        let proto = p.protocol;
        let (hp, sp) = (p.host_port, p.sandbox_port);
        match p.host_addr {
            // Only while the address is the host's: a publish never captures traffic the
            // host forwards or sends elsewhere.
            Some(IpAddr::V4(h)) => {
                let _ = writeln!(
                    rules,
                    "\t\tip daddr {h} fib daddr type local {proto} dport {hp} dnat ip to {}:{sp}",
                    a.sandbox4
                );
                if h.is_loopback() {
                    let _ = writeln!(
                        local,
                        "\t\tip daddr {h} {proto} dport {hp} dnat ip to {}:{sp}",
                        a.sandbox4
                    );
                }
            }
            Some(IpAddr::V6(h)) => {
                let _ = writeln!(
                    rules,
                    "\t\tip6 daddr {h} fib daddr type local {proto} dport {hp} dnat ip6 to [{}]:{sp}",
                    a.sandbox6
                );
            }
            // Every address of the host, and of its loopback 127.0.0.1 only: another loopback
            // address (a stub resolver's 127.0.0.53) is left alone.
            None => {
                let _ = writeln!(
                    rules,
                    "\t\tfib daddr type local ip daddr != 127.0.0.0/8 {proto} dport {hp} dnat ip to {}:{sp}",
                    a.sandbox4
                );
                let _ = writeln!(
                    rules,
                    "\t\tfib daddr type local ip6 daddr != ::1 {proto} dport {hp} dnat ip6 to [{}]:{sp}",
                    a.sandbox6
                );
                let _ = writeln!(
                    local,
                    "\t\tip daddr 127.0.0.1 {proto} dport {hp} dnat ip to {}:{sp}",
                    a.sandbox4
                );
            }
        }
    }
    format!(
        r#"
	# --publish: the host's ports to the sandbox's.
	chain publish_in {{
		type nat hook prerouting priority dstnat; policy accept;
		iifname "{IF_PREFIX}*" return
{rules}	}}

	chain publish_local {{
		type nat hook output priority -100; policy accept;
{rules}{local}	}}
"#
    )
}

/// The table of a named network: the host never tells a sandbox to bypass it. Forwarding
/// from the bridge back onto it would make the kernel send ICMP and ICMPv6 redirects, and a
/// sandbox that followed one would try its neighbour directly, which port isolation drops.
pub fn network_ruleset(table: &str, bridge: &str) -> String {
    format!(
        r#"table inet {table} {{
	chain host_output {{
		type filter hook output priority filter; policy accept;
		oifname "{bridge}" icmp type redirect drop
		oifname "{bridge}" icmpv6 type nd-redirect drop
	}}
}}
"#
    )
}

/// The shared table that keeps forwarding confined to sandbox interfaces, for the families
/// whose forwarding Portcullis itself turned on (`confine4`, `confine6`): forwarded traffic of
/// those families between the namespace's other interfaces is dropped, as it was before, and
/// a family that was already forwarding is left alone.
pub fn forward_guard_ruleset(confine4: bool, confine6: bool) -> String {
    let mut drops = String::new();
    if confine4 {
        drops.push_str("\t\tmeta nfproto ipv4 drop\n");
    }
    if confine6 {
        drops.push_str("\t\tmeta nfproto ipv6 drop\n");
    }
    format!(
        r#"table inet {GLOBAL_TABLE} {{
	chain forward_guard {{
		type filter hook forward priority filter - 1; policy accept;
		iifname "{IF_PREFIX}*" accept
		oifname "{IF_PREFIX}*" accept
{drops}	}}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of every test: relay ports 1001-1004, NFLOG group 4242, nothing else.
    fn rules<'a>(id: &'a SandboxId, a: &'a Addressing) -> SandboxRules<'a> {
        SandboxRules {
            id,
            addressing: a,
            relay: RelayPorts {
                udp4: 1001,
                tcp4: 1002,
                udp6: 1003,
                tcp6: 1004,
            },
            statics: &[],
            nflog_group: 4242,
            learn: false,
            publish: &[],
            bridge: None,
        }
    }

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

    #[test]
    fn guard_confines_only_the_families_portcullis_turned_on() {
        let only6 = forward_guard_ruleset(false, true);
        assert!(only6.contains("meta nfproto ipv6 drop") && !only6.contains("ipv4 drop"));
        let both = forward_guard_ruleset(true, true);
        assert!(both.contains("meta nfproto ipv4 drop") && both.contains("meta nfproto ipv6 drop"));
    }

    #[test]
    fn ruleset_names_everything_after_the_sandbox() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let statics = [
            StaticAllow {
                net: "198.51.100.0/24".parse().unwrap(),
                ports: vec![],
            },
            StaticAllow {
                net: "2001:db8::/48".parse().unwrap(),
                ports: vec![(Protocol::Tcp, 443)],
            },
        ];
        let text = sandbox_ruleset(&SandboxRules {
            statics: &statics,
            ..rules(&id, &a)
        });
        assert!(!text.contains("ct mark"));
        assert!(text.starts_with("table inet portcullis_0a1b2c3d {"));
        assert!(text.contains(r#"iifname "pc-0a1b2c3d-h" meta nfproto ipv4 udp dport 53 dnat ip to 203.0.113.129:1001"#));
        assert!(text.contains("dnat ip6 to [2001:db8:fffe::1]:1004"));
        assert!(text.contains("ip daddr 198.51.100.0/24 accept"));
        assert!(text.contains("ip6 daddr 2001:db8::/48 tcp dport 443 accept"));
        assert!(text.contains("log group 4242"));
        // Both logging rules take a burst as large as the rate: with nft's default of 5, a
        // CMD that tried many destinations at once had most of them missing from the report
        // (found by tests/attacks.rs).
        assert_eq!(
            text.matches("limit rate 200/second burst 200 packets log group 4242")
                .count(),
            2
        );
        // The egress chain ends in the logged drop: nothing after it can accept.
        let egress =
            &text[text.find("chain egress").unwrap()..text.find("chain source_nat").unwrap()];
        assert!(
            egress
                .trim_end()
                .trim_end_matches('}')
                .trim_end()
                .ends_with("counter name blocked drop")
        );
        // The sandbox kernel's router solicitations and MLD reports are dropped before any
        // rule counts or logs them: they are not CMD's flows.
        let input =
            &text[text.find("chain host_input").unwrap()..text.find("chain forward").unwrap()];
        let quiet = input.find("nd-router-solicit").unwrap();
        assert!(quiet < input.find("counter name blocked").unwrap());
        assert!(
            input[quiet..].starts_with(
                "nd-router-solicit, mld-listener-report, mld2-listener-report } drop\n"
            )
        );
    }

    #[test]
    fn learning_logs_each_new_flow_once_and_lets_it_through() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let text = sandbox_ruleset(&SandboxRules {
            learn: true,
            ..rules(&id, &a)
        });
        let egress =
            &text[text.find("chain egress").unwrap()..text.find("chain source_nat").unwrap()];
        // Anti-spoofing still comes first; then the unlimited log of the first packet.
        let spoof = egress.find("ip6 saddr !=").unwrap();
        let log = egress
            .find("ct mark and 0x100000 == 0 ct mark set ct mark or 0x100000 log group 4242\n")
            .unwrap();
        assert!(spoof < log);
        assert!(egress[log..].contains("\t\taccept\n"));
        // What the host drops is not logged as a flow of the job.
        let input =
            &text[text.find("chain host_input").unwrap()..text.find("chain forward").unwrap()];
        assert!(!input.contains("log group"));
        // The DNS redirect is the same as in run: every query reaches the relay.
        assert!(text.contains("udp dport 53 dnat ip to 203.0.113.129:1001"));
    }

    #[test]
    fn published_ports_are_dnatted_from_outside_and_from_the_host_and_accepted() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let publish = [
            Publish {
                host_addr: None,
                host_port: 8080,
                sandbox_port: 80,
                protocol: Protocol::Tcp,
            },
            Publish {
                host_addr: Some("203.0.113.1".parse().unwrap()),
                host_port: 5353,
                sandbox_port: 53,
                protocol: Protocol::Udp,
            },
        ];
        let text = sandbox_ruleset(&SandboxRules {
            publish: &publish,
            ..rules(&id, &a)
        });
        let nat_in = &text
            [text.find("chain publish_in").unwrap()..text.find("chain publish_local").unwrap()];
        // No sandbox reaches another's published port, and none has its DNS captured by one.
        assert!(nat_in.contains(r#"iifname "pc-*" return"#));
        assert!(text.contains("type nat hook prerouting priority dstnat - 10;"));
        assert!(nat_in.contains(
            "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 dnat ip to 203.0.113.130:80"
        ));
        assert!(!nat_in.contains("ip daddr 127.0.0.1"));
        let nat_local = &text[text.find("chain publish_local").unwrap()..];
        assert!(
            nat_local.contains("ip daddr 127.0.0.1 tcp dport 8080 dnat ip to 203.0.113.130:80")
        );
        assert!(
            nat_in.contains("ip6 daddr != ::1 tcp dport 8080 dnat ip6 to [2001:db8:fffe::2]:80")
        );
        assert!(nat_in.contains(
            "ip daddr 203.0.113.1 fib daddr type local udp dport 5353 dnat ip to 203.0.113.130:53"
        ));
        assert!(
            !nat_in.contains("udp dport 5353 dnat ip6"),
            "an IPv4 host address is IPv4 only"
        );
        // The host's own connections, 127.0.0.1 included, are DNATed in output and leave with
        // the host side's address.
        assert!(text.contains("type nat hook output priority -100"));
        assert!(text.contains(r#"oifname "pc-0a1b2c3d-h" ip saddr 127.0.0.0/8 masquerade"#));
        // Only DNATed connections to the published ports pass, in forward and from the host.
        let accept =
            r#"oifname "pc-0a1b2c3d-h" ct status dnat ip daddr 203.0.113.130 tcp dport 80 accept"#;
        assert_eq!(text.matches(accept).count(), 2);
        let host_output =
            &text[text.find("chain host_output").unwrap()..text.find("# --publish").unwrap()];
        assert!(
            host_output
                .trim_end()
                .trim_end_matches('}')
                .trim_end()
                .ends_with("drop")
        );
    }

    #[test]
    fn on_a_network_everything_is_keyed_on_the_bridge_and_the_sandboxes_addresses() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = Addressing {
            host4: "203.0.113.193".parse().unwrap(),
            sandbox4: "203.0.113.194".parse().unwrap(),
            prefix4: 32,
            host6: "2001:db8:fffe:ff::1".parse().unwrap(),
            sandbox6: "2001:db8:fffe:ff::2".parse().unwrap(),
            prefix6: 128,
        };
        let text = sandbox_ruleset(&SandboxRules {
            bridge: Some("pc-n01234567"),
            ..rules(&id, &a)
        });
        // The sandbox's own link appears nowhere: its packets enter on the bridge.
        assert!(!text.contains("pc-0a1b2c3d-h"), "{text}");
        assert!(text.contains(r#"iifname "pc-n01234567" ip saddr 203.0.113.194 meta nfproto ipv4 udp dport 53 dnat ip to 203.0.113.193:1001"#));
        assert!(
            text.contains(r#"iifname "pc-n01234567" ip6 saddr 2001:db8:fffe:ff::2 jump egress"#)
        );
        // Other sandboxes' packets are left to their own tables, in input and output.
        let input =
            &text[text.find("chain host_input").unwrap()..text.find("chain forward").unwrap()];
        let ret = input.find("ip saddr != 203.0.113.194 return").unwrap();
        assert!(ret < input.find("counter name blocked").unwrap());
        assert!(
            text.contains("ip6 daddr != { 2001:db8:fffe:ff::2, fe80::70:aff:fe1b:2c3d } return")
        );
        // Towards the sandbox: replies, other sandboxes (their egress decided), else drop.
        let forward =
            &text[text.find("chain forward").unwrap()..text.find("chain host_output").unwrap()];
        let from_peer = forward
            .find(r#"oifname "pc-n01234567" iifname "pc-n01234567" ip daddr 203.0.113.194 accept"#)
            .unwrap();
        let drop = forward
            .find(r#"oifname "pc-n01234567" ip daddr 203.0.113.194 counter name blocked drop"#)
            .unwrap();
        assert!(from_peer < drop);
        assert!(text.contains(r#"oifname != "pc-n01234567" ip saddr 203.0.113.194 masquerade"#));
        let net = network_ruleset("portcullis_n01234567", "pc-n01234567");
        assert!(net.contains(r#"oifname "pc-n01234567" icmpv6 type nd-redirect drop"#));
    }

    #[test]
    fn replacing_flushes_every_chain_and_keeps_the_sets() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let script = sandbox_ruleset(&rules(&id, &a));
        let r = replace_chains(&script, &id.table());
        for chain in [
            "dns_redirect",
            "host_input",
            "forward",
            "host_output",
            "egress",
            "source_nat",
        ] {
            assert!(
                r.contains(&format!("flush chain inet {} {chain}\n", id.table())),
                "{chain}: {r}"
            );
        }
        assert!(!r.contains("flush set") && !r.contains("delete"), "{r}");
        assert!(r.ends_with(&script));
    }

    #[test]
    fn without_publish_nothing_enters() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let text = sandbox_ruleset(&SandboxRules { ..rules(&id, &a) });
        assert!(!text.contains("publish_in") && !text.contains("ct status dnat"));
        assert!(!text.contains("127.0.0.0/8"));
        assert!(text.contains("chain host_output"));
    }
}
