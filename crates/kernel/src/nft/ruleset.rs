//! The nftables ruleset of the sandboxes, as `nft -f` text. Pure: no I/O, tested without root.
//!
//! Every sandbox of a namespace lives in one shared table (`inet portcullis_sandboxes`): one
//! base chain per hook (forward, input, output, the DNS redirect, source NAT) dispatches each
//! packet through maps keyed on its link (on a named network, its bridge and address) to the
//! chains of the one sandbox it concerns. A table per sandbox, with base chains of its own,
//! would make every packet of the host run through every sandbox's chains: with 100
//! sandboxes, everyone's new connections/s fell to 0.29x (docs/benchmarks.md).
//!
//! A sandbox's chains, sets and counters are named after it (`egress_<id>`, `allow4_<id>`);
//! its set-up adds them and its elements in one transaction, and [`sandbox_objects`] lists
//! what its teardown removes. The shared table goes with the last sandbox.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use portcullis_policy::Protocol;

use crate::names::{
    COUNTER_BLOCKED, COUNTER_OPENED4, COUNTER_OPENED6, GLOBAL_TABLE, IF_PREFIX, SET_ALLOW4,
    SET_ALLOW4_PORT, SET_ALLOW6, SET_ALLOW6_PORT, SHARED_TABLE, SandboxId,
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

/// The `nft -f` script that gives the sandbox its chains, sets and counters in the shared
/// table and adds its elements to the dispatch maps: one atomic transaction. Its chains are
/// reached only through those elements, so a packet of another sandbox, or of the host, never
/// runs through them. With `skeleton`, the script also declares the shared table, its maps,
/// sets and base chains, and writes the base chains' rules anew: what the first sandbox
/// needs, harmless (but 15 ms slower) where the table is already there. Without, it relies on
/// the table being there (it fails, closed, where it is not).
pub fn sandbox_ruleset(r: &SandboxRules<'_>, skeleton: bool) -> String {
    let id = r.id;
    let a = r.addressing;
    let p = r.relay;
    let o = |base: &str| id.object(base);
    let (blocked, opened4, opened6) = (o(COUNTER_BLOCKED), o(COUNTER_OPENED4), o(COUNTER_OPENED6));
    let objects = objects_of(r);
    // What reaches the sandbox from elsewhere: on a network, new flows from another sandbox
    // of it, which that sandbox's own egress chain has already allowed (a drop there is
    // final); published ports; nothing else (replies were accepted before the dispatch).
    let from_peers = match r.bridge {
        Some(br) => format!("\t\tiifname \"{br}\" accept\n"),
        None => String::new(),
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"table inet {SHARED_TABLE} {{
{skeleton}{sets}	counter {opened4} {{ }}
	counter {opened6} {{ }}

	chain {dns} {{
		meta nfproto ipv4 udp dport 53 dnat ip to {h4}:{u4}
		meta nfproto ipv4 tcp dport 53 dnat ip to {h4}:{t4}
		meta nfproto ipv6 udp dport 53 dnat ip6 to [{h6}]:{u6}
		meta nfproto ipv6 tcp dport 53 dnat ip6 to [{h6}]:{t6}
	}}

	chain {input} {{
		# The sandbox kernel's own link chatter (router solicitations, MLD reports; CMD has no
		# raw sockets to send them) is no flow of CMD's: dropped without counting or logging.
		icmpv6 type {{ nd-router-solicit, mld-listener-report, mld2-listener-report }} drop
		# New flows are counted: a run that started none left no conntrack entry behind.
		ct state new meta nfproto ipv4 counter name {opened4}
		ct state new meta nfproto ipv6 counter name {opened6}
		meta nfproto ipv4 ip saddr != {s4} counter name {blocked} drop
		meta nfproto ipv6 ip6 saddr != {{ {s6}, fe80::/10 }} counter name {blocked} drop
		ct state established,related accept
		ip daddr {h4} udp dport {u4} accept
		ip daddr {h4} tcp dport {t4} accept
		ip6 daddr {h6} udp dport {u6} accept
		ip6 daddr {h6} tcp dport {t6} accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
{host_log}		counter name {blocked} drop
	}}

	chain {to} {{
{from_peers}{publish_forward}		counter name {blocked} drop
	}}

	# Nothing here is CMD's doing: the drops are not counted as blocked.
	chain {output} {{
		ct state established,related accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
{publish_forward}		counter drop
	}}
{publish_nat}
	# Egress: what DNS answers and CIDR rules opened returns (the chain of the sandbox it goes
	# to, if any, has its say too); the rest is logged and dropped.
	chain {egress} {{
		ct state new meta nfproto ipv4 counter name {opened4}
		ct state new meta nfproto ipv6 counter name {opened6}
		meta nfproto ipv4 ip saddr != {s4} counter name {blocked} drop
		meta nfproto ipv6 ip6 saddr != {s6} counter name {blocked} drop
{learn}		ip daddr @{allow4} return
		ip6 daddr @{allow6} return
		meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @{allow4p} return
		meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport @{allow6p} return
{statics}		limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets log group {g}
		counter name {blocked} drop
	}}
}}
"#,
        skeleton = if skeleton {
            skeleton_declarations()
        } else {
            String::new()
        },
        sets = set_declarations(Some(id)),
        dns = o("dns"),
        input = o("input"),
        to = o("to"),
        output = o("output"),
        egress = o("egress"),
        allow4 = o(SET_ALLOW4),
        allow6 = o(SET_ALLOW6),
        allow4p = o(SET_ALLOW4_PORT),
        allow6p = o(SET_ALLOW6_PORT),
        h4 = a.host4,
        h6 = a.host6,
        s4 = a.sandbox4,
        s6 = a.sandbox6,
        u4 = p.udp4,
        t4 = p.tcp4,
        u6 = p.udp6,
        t6 = p.tcp6,
        g = r.nflog_group,
        publish_forward = publish_accepts(r),
        publish_nat = publish_nat(r),
        statics = static_accepts(r.statics, "return"),
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
        learn = if r.learn {
            format!(
                "\t\t# Learning: every new flow is logged once, then let through.\n\
                 \t\tct mark and {LEARN_CT_BIT:#x} == 0 ct mark set ct mark or {LEARN_CT_BIT:#x} log group {g}\n\
                 \t\treturn\n",
                g = r.nflog_group
            )
        } else {
            String::new()
        },
    );
    if skeleton {
        s.push_str(&skeleton_rules());
    }
    for e in &objects.elements {
        let key = e
            .key
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" . ");
        let data = e
            .jump
            .as_ref()
            .map(|c| format!(" : jump {c}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "add element inet {SHARED_TABLE} {} {{ {key}{data} }}",
            e.set
        );
    }
    s
}

/// What the sandbox of `r` owns in the shared table.
pub fn objects_of(r: &SandboxRules<'_>) -> SandboxObjects {
    sandbox_objects(
        r.id,
        r.addressing,
        r.bridge,
        !r.publish.is_empty(),
        r.publish.iter().any(Publish::from_loopback4),
    )
}

/// The `nft -f` script removing what the sandbox owns in the shared table (a `run` without
/// netlink, and tests): its elements first, so that nothing jumps to its chains any more.
pub fn teardown_script(objects: &SandboxObjects) -> String {
    let mut s = String::new();
    for e in &objects.elements {
        let key = e
            .key
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" . ");
        let _ = writeln!(
            s,
            "delete element inet {SHARED_TABLE} {} {{ {key} }}",
            e.set
        );
    }
    for c in &objects.chains {
        let _ = writeln!(s, "flush chain inet {SHARED_TABLE} {c}");
    }
    for c in &objects.chains {
        let _ = writeln!(s, "delete chain inet {SHARED_TABLE} {c}");
    }
    for set in &objects.sets {
        let _ = writeln!(s, "delete set inet {SHARED_TABLE} {set}");
    }
    for c in &objects.counters {
        let _ = writeln!(s, "delete counter inet {SHARED_TABLE} {c}");
    }
    s
}

/// The shared table's dispatch maps and address sets, each with its key type: a sandbox adds
/// its elements at set-up and removes them at teardown. Maps ending in 4 or 6 key a sandbox of
/// a named network on its bridge and one of its addresses; the others key it on its own link.
pub const SHARED_MAPS: [(&str, &str); 19] = [
    ("forward_from", "ifname : verdict"),
    ("forward_from4", "ifname . ipv4_addr : verdict"),
    ("forward_from6", "ifname . ipv6_addr : verdict"),
    ("forward_to", "ifname : verdict"),
    ("forward_to4", "ifname . ipv4_addr : verdict"),
    ("forward_to6", "ifname . ipv6_addr : verdict"),
    ("input_from", "ifname : verdict"),
    ("input_from4", "ifname . ipv4_addr : verdict"),
    ("input_from6", "ifname . ipv6_addr : verdict"),
    ("output_to", "ifname : verdict"),
    ("output_to4", "ifname . ipv4_addr : verdict"),
    ("output_to6", "ifname . ipv6_addr : verdict"),
    ("dns_from", "ifname : verdict"),
    ("dns_from4", "ifname . ipv4_addr : verdict"),
    ("dns_from6", "ifname . ipv6_addr : verdict"),
    // Source NAT: a sandbox's addresses, and the same with its own link (no NAT back onto it).
    ("masquerade4", "ipv4_addr"),
    ("masquerade6", "ipv6_addr"),
    ("own_link4", "ipv4_addr . ifname"),
    ("own_link6", "ipv6_addr . ifname"),
];
/// Published from the host's loopback: the sandbox's link and address (see `source_nat`).
const LOOPBACK_NAT: (&str, &str) = ("loopback_nat", "ifname . ipv4_addr");

/// One part of an element's key in the shared table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Ifname(String),
    Addr(IpAddr),
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Ifname(n) => write!(f, "\"{n}\""),
            KeyPart::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// One element a sandbox puts in a map or set of the shared table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedElement {
    pub set: &'static str,
    pub key: Vec<KeyPart>,
    /// For a map: the sandbox's chain it jumps to (its full name).
    pub jump: Option<String>,
}

/// Everything one sandbox owns in the shared table, in the order its teardown removes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxObjects {
    pub elements: Vec<SharedElement>,
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub counters: Vec<String>,
}

/// The chains a sandbox has in the shared table, before its id is appended.
const CHAINS: [&str; 5] = ["egress", "to", "input", "output", "dns"];
/// The base chains a sandbox that publishes ports adds (DNAT from elsewhere and from the host).
const PUBLISH_CHAINS: [&str; 2] = ["publish_in", "publish_local"];
const SETS: [&str; 4] = [SET_ALLOW4, SET_ALLOW6, SET_ALLOW4_PORT, SET_ALLOW6_PORT];
const COUNTERS: [&str; 3] = [COUNTER_BLOCKED, COUNTER_OPENED4, COUNTER_OPENED6];

/// What sandbox `id` owns in the shared table, with `addressing`, on `bridge` (a named
/// network) or its own link. `published`: it publishes ports; `loopback`: from the host's
/// IPv4 loopback too. The one list both its set-up and its teardown are written from.
pub fn sandbox_objects(
    id: &SandboxId,
    a: &Addressing,
    bridge: Option<&str>,
    published: bool,
    loopback: bool,
) -> SandboxObjects {
    let dev = bridge.map_or_else(|| id.host_ifname(), str::to_owned);
    let ifname = || KeyPart::Ifname(dev.clone());
    let (s4, s6) = (
        KeyPart::Addr(a.sandbox4.into()),
        KeyPart::Addr(a.sandbox6.into()),
    );
    let ll = KeyPart::Addr(id.sandbox_link_local().into());
    let jump = |set: &'static str, key: Vec<KeyPart>, chain: &str| SharedElement {
        set,
        key,
        jump: Some(id.object(chain)),
    };
    let mut elements = Vec::new();
    match bridge {
        None => {
            for (map, chain) in [
                ("forward_from", "egress"),
                ("forward_to", "to"),
                ("input_from", "input"),
                ("output_to", "output"),
                ("dns_from", "dns"),
            ] {
                elements.push(jump(map, vec![ifname()], chain));
            }
        }
        // On a network, its packets are told from the others' by its addresses; the host
        // also talks to it, and it to the host, from its link-local address.
        Some(_) => {
            for (map, chain, link_local) in [
                ("forward_from", "egress", false),
                ("forward_to", "to", false),
                ("input_from", "input", true),
                ("output_to", "output", true),
                ("dns_from", "dns", false),
            ] {
                let (m4, m6) = map_names(map);
                elements.push(jump(m4, vec![ifname(), s4.clone()], chain));
                elements.push(jump(m6, vec![ifname(), s6.clone()], chain));
                if link_local {
                    elements.push(jump(m6, vec![ifname(), ll.clone()], chain));
                }
            }
        }
    }
    let plain = |set: &'static str, key: Vec<KeyPart>| SharedElement {
        set,
        key,
        jump: None,
    };
    elements.push(plain("masquerade4", vec![s4.clone()]));
    elements.push(plain("masquerade6", vec![s6.clone()]));
    elements.push(plain("own_link4", vec![s4.clone(), ifname()]));
    elements.push(plain("own_link6", vec![s6, ifname()]));
    if loopback {
        elements.push(plain(LOOPBACK_NAT.0, vec![ifname(), s4]));
    }
    let mut chains: Vec<String> = CHAINS.iter().map(|c| id.object(c)).collect();
    if published {
        chains.extend(PUBLISH_CHAINS.iter().map(|c| id.object(c)));
    }
    SandboxObjects {
        elements,
        chains,
        sets: SETS.iter().map(|s| id.object(s)).collect(),
        counters: COUNTERS.iter().map(|c| id.object(c)).collect(),
    }
}

/// The IPv4 and IPv6 maps (a network's) of the own-link map `map`.
fn map_names(map: &str) -> (&'static str, &'static str) {
    let find = |suffix: &str| {
        SHARED_MAPS
            .iter()
            .map(|(n, _)| *n)
            .find(|n| n.strip_suffix(suffix) == Some(map))
            .unwrap_or("")
    };
    (find("4"), find("6"))
}

/// The shared table's maps, sets and base chains, as lines of its `table` block. Each base
/// chain is declared once in a transaction: declared again in the same one (a second block,
/// or `add chain`), it made `nft -f` take 15 ms longer (measured: 22.9 ms against 7.5 ms).
fn skeleton_declarations() -> String {
    let mut s = String::new();
    for (name, ty) in SHARED_MAPS.iter().chain([&LOOPBACK_NAT]) {
        let kind = if ty.contains(": verdict") {
            "map"
        } else {
            "set"
        };
        let _ = writeln!(s, "\t{kind} {name} {{ type {ty}; }}");
    }
    for (chain, hook) in SHARED_BASE_CHAINS {
        let _ = writeln!(s, "\tchain {chain} {{ {hook} }}");
    }
    s
}

/// The base chains' rules, as commands after the `table` block: each chain flushed, then
/// written anew, so that a transaction that finds the table already there leaves it as it
/// was. The comments say what each chain does.
fn skeleton_rules() -> String {
    let dispatch = |dir: &str, prefix: &str| {
        let d = if dir == "iif" { "s" } else { "d" };
        [
            format!("{dir}name vmap @{prefix}"),
            format!("meta nfproto ipv4 {dir}name . ip {d}addr vmap @{prefix}4"),
            format!("meta nfproto ipv6 {dir}name . ip6 {d}addr vmap @{prefix}6"),
        ]
    };
    // Running flows first, whoever's (the one rule most packets meet); then the sandbox the
    // packet comes from, whose egress chain drops it or returns, then the one it goes to.
    let mut forward = vec!["ct state established,related accept".to_owned()];
    forward.extend(dispatch("iif", "forward_from"));
    forward.extend(dispatch("oif", "forward_to"));
    // A sandbox's flows leave with the host's address, but onto its own link; so do the
    // host's connections from 127.0.0.1 to a published port (the sandbox could not answer).
    let source_nat = [
        "ip saddr . oifname @own_link4 return".to_owned(),
        "ip6 saddr . oifname @own_link6 return".to_owned(),
        "ip saddr @masquerade4 masquerade".to_owned(),
        "ip6 saddr @masquerade6 masquerade".to_owned(),
        format!(
            "ip saddr 127.0.0.0/8 oifname . ip daddr @{} masquerade",
            LOOPBACK_NAT.0
        ),
    ];
    let chains: [(&str, Vec<String>); 5] = [
        ("forward", forward),
        // From a sandbox, the host accepts the relay's ports and neighbour discovery only.
        ("input", dispatch("iif", "input_from").to_vec()),
        // From the host itself, a sandbox takes replies, neighbour discovery, published ports.
        ("output", dispatch("oif", "output_to").to_vec()),
        // Every DNS packet of a sandbox, whatever its destination, goes to its relay.
        ("dns", dispatch("iif", "dns_from").to_vec()),
        ("source_nat", source_nat.to_vec()),
    ];
    let mut s = String::new();
    for (chain, _) in &chains {
        let _ = writeln!(s, "flush chain inet {SHARED_TABLE} {chain}");
    }
    for (chain, rules) in &chains {
        for rule in rules {
            let _ = writeln!(s, "add rule inet {SHARED_TABLE} {chain} {rule}");
        }
    }
    s
}

/// The shared table alone: its maps, sets and base chains with their rules, as one idempotent
/// script (for tests and the docs; a sandbox's set-up writes it with its own part).
pub fn shared_skeleton() -> String {
    format!(
        "table inet {SHARED_TABLE} {{\n{}}}\n{}",
        skeleton_declarations(),
        skeleton_rules()
    )
}

/// The names of the shared table's own base chains, and of its own maps and sets: what is
/// left of it when no sandbox is.
pub fn skeleton_objects() -> (Vec<&'static str>, Vec<&'static str>) {
    (
        SHARED_BASE_CHAINS.iter().map(|(c, _)| *c).collect(),
        SHARED_MAPS
            .iter()
            .chain([&LOOPBACK_NAT])
            .map(|(n, _)| *n)
            .collect(),
    )
}

/// The shared table's base chains and their hooks.
const SHARED_BASE_CHAINS: [(&str, &str); 5] = [
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
    ),
    (
        "input",
        "type filter hook input priority filter; policy accept;",
    ),
    (
        "output",
        "type filter hook output priority filter; policy accept;",
    ),
    (
        "dns",
        "type nat hook prerouting priority dstnat - 10; policy accept;",
    ),
    (
        "source_nat",
        "type nat hook postrouting priority srcnat; policy accept;",
    ),
];

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

/// The dynamic allow sets the relay writes and the `blocked` counter: the same in a host-mode
/// run's table and, named after the sandbox (`Some(id)`), in the shared table.
pub(crate) fn set_declarations(id: Option<&SandboxId>) -> String {
    let n = |base: &str| id.map_or_else(|| base.to_owned(), |id| id.object(base));
    format!(
        "\tset {} {{ type ipv4_addr; flags timeout; size {SET_SIZE}; }}\n\
         \tset {} {{ type ipv6_addr; flags timeout; size {SET_SIZE}; }}\n\
         \tset {} {{ type ipv4_addr . inet_proto . inet_service; flags timeout; size {SET_SIZE}; }}\n\
         \tset {} {{ type ipv6_addr . inet_proto . inet_service; flags timeout; size {SET_SIZE}; }}\n\
         \tcounter {} {{ }}\n",
        n(SET_ALLOW4),
        n(SET_ALLOW6),
        n(SET_ALLOW4_PORT),
        n(SET_ALLOW6_PORT),
        n(COUNTER_BLOCKED),
    )
}

/// Rules ending in `verdict` (`accept`, or `return` in a sandbox's egress chain) for the
/// destinations the policy's CIDR rules allow.
pub(crate) fn static_accepts(statics: &[StaticAllow], verdict: &str) -> String {
    let mut s = String::new();
    for st in statics {
        let family = match st.net {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        if st.ports.is_empty() {
            let _ = writeln!(s, "\t\t{family} daddr {} {verdict}", st.net);
        }
        for (proto, port) in &st.ports {
            let _ = writeln!(
                s,
                "\t\t{family} daddr {} {proto} dport {port} {verdict}",
                st.net
            );
        }
    }
    s
}

/// `accept` rules for connections DNATed to a published port of the sandbox (in its chains
/// that packets towards it are dispatched to).
fn publish_accepts(r: &SandboxRules<'_>) -> String {
    let a = r.addressing;
    let mut s = String::new();
    for p in r.publish {
        let proto = p.protocol;
        let port = p.sandbox_port;
        if p.v4() {
            let _ = writeln!(
                s,
                "\t\tct status dnat ip daddr {} {proto} dport {port} accept",
                a.sandbox4
            );
        }
        if p.v6() {
            let _ = writeln!(
                s,
                "\t\tct status dnat ip6 daddr {} {proto} dport {port} accept",
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
	chain {publish_in} {{
		type nat hook prerouting priority dstnat; policy accept;
		iifname "{IF_PREFIX}*" return
{rules}	}}

	chain {publish_local} {{
		type nat hook output priority -100; policy accept;
{rules}{local}	}}
"#,
        publish_in = r.id.object("publish_in"),
        publish_local = r.id.object("publish_local"),
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

    /// The text of chain `name` (its full name) in `script`, up to its closing brace.
    fn chain<'a>(script: &'a str, name: &str) -> &'a str {
        let start = script
            .find(&format!("\tchain {name} {{\n"))
            .unwrap_or_else(|| panic!("no chain {name} in {script}"));
        let len = script[start..].find("\n\t}").unwrap();
        &script[start..start + len]
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
        let text = sandbox_ruleset(
            &SandboxRules {
                statics: &statics,
                ..rules(&id, &a)
            },
            true,
        );
        assert!(!text.contains("ct mark"));
        assert!(text.starts_with("table inet portcullis_sandboxes {"));
        // Only the shared table's base chains are hooked; the sandbox's are reached through
        // its elements, keyed on its link.
        assert_eq!(text.matches("type filter hook").count(), 3, "{text}");
        assert!(!text.contains("table inet portcullis_0a1b2c3d"));
        for (map, chain) in [
            ("forward_from", "egress"),
            ("forward_to", "to"),
            ("input_from", "input"),
            ("output_to", "output"),
            ("dns_from", "dns"),
        ] {
            let line = format!(
                "add element inet portcullis_sandboxes {map} {{ \"pc-0a1b2c3d-h\" : jump {chain}_0a1b2c3d }}\n"
            );
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains("masquerade4 { 203.0.113.130 }"));
        assert!(text.contains("own_link6 { 2001:db8:fffe::2 . \"pc-0a1b2c3d-h\" }"));
        let dns = chain(&text, "dns_0a1b2c3d");
        assert!(dns.contains("meta nfproto ipv4 udp dport 53 dnat ip to 203.0.113.129:1001"));
        assert!(dns.contains("dnat ip6 to [2001:db8:fffe::1]:1004"));
        let egress = chain(&text, "egress_0a1b2c3d");
        assert!(egress.contains("ip daddr 198.51.100.0/24 return"));
        assert!(egress.contains("ip6 daddr 2001:db8::/48 tcp dport 443 return"));
        assert!(egress.contains("ip daddr @allow4_0a1b2c3d return"));
        assert!(!egress.contains("accept"), "{egress}");
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
        assert!(egress.ends_with("counter name blocked_0a1b2c3d drop"));
        // The sandbox kernel's router solicitations and MLD reports are dropped before any
        // rule counts or logs them: they are not CMD's flows.
        let input = chain(&text, "input_0a1b2c3d");
        let quiet = input.find("nd-router-solicit").unwrap();
        assert!(quiet < input.find("counter name blocked").unwrap());
        assert!(
            input[quiet..].starts_with(
                "nd-router-solicit, mld-listener-report, mld2-listener-report } drop\n"
            )
        );
        // Towards the sandbox from elsewhere: nothing new gets in.
        assert_eq!(
            chain(&text, "to_0a1b2c3d").trim(),
            "chain to_0a1b2c3d {\n\t\tcounter name blocked_0a1b2c3d drop"
        );
    }

    #[test]
    fn the_shared_chains_accept_running_flows_first_and_let_both_ends_have_their_say() {
        let s = shared_skeleton();
        // Idempotent: declared empty (once: a base chain declared twice in a transaction costs
        // it 15 ms), flushed, written anew.
        assert_eq!(s.matches("chain forward {").count(), 1);
        let rule = |chain: &str| format!("add rule inet portcullis_sandboxes {chain} ");
        let flush = s
            .find("flush chain inet portcullis_sandboxes forward\n")
            .unwrap();
        let forward: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix(&rule("forward")))
            .collect();
        assert!(flush < s.find(&rule("forward")).unwrap());
        assert_eq!(
            forward[..2],
            [
                "ct state established,related accept",
                "iifname vmap @forward_from"
            ]
        );
        // The sandbox it comes from, then the one it goes to: egress returns, not accepts.
        let pos = |r: &str| forward.iter().position(|l| *l == r).unwrap();
        assert!(
            pos("meta nfproto ipv6 iifname . ip6 saddr vmap @forward_from6")
                < pos("oifname vmap @forward_to")
        );
        assert!(forward.contains(&"meta nfproto ipv6 oifname . ip6 daddr vmap @forward_to6"));
        let nat: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix(&rule("source_nat")))
            .collect();
        assert_eq!(nat[0], "ip saddr . oifname @own_link4 return");
        assert!(nat.contains(&"ip saddr @masquerade4 masquerade"));
        for (name, ty) in SHARED_MAPS {
            let kind = if ty.ends_with("verdict") {
                "map"
            } else {
                "set"
            };
            assert!(
                s.contains(&format!("\t{kind} {name} {{ type {ty}; }}\n")),
                "{name}"
            );
        }
        // A sandbox's script holds it only when asked to.
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let with = sandbox_ruleset(&rules(&id, &a), true);
        assert!(with.contains("chain forward {"));
        // Its rules, after the block, before the elements that lead to the sandbox's chains.
        let rules_at = with
            .find(
                "add rule inet portcullis_sandboxes forward ct state established,related accept\n",
            )
            .expect("the base chains' rules");
        assert!(
            rules_at
                > with
                    .find("flush chain inet portcullis_sandboxes forward")
                    .unwrap()
        );
        assert!(rules_at < with.find("add element").unwrap());
        assert_eq!(
            with.matches("add rule inet portcullis_sandboxes ").count(),
            7 + 3 + 3 + 3 + 5
        );
        let without = sandbox_ruleset(&rules(&id, &a), false);
        assert!(!without.contains("chain forward {") && !without.contains("flush"));
        assert!(without.contains("chain egress_0a1b2c3d {"));
    }

    #[test]
    fn the_teardown_removes_exactly_what_the_set_up_added() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let publish = [Publish {
            host_addr: None,
            host_port: 8080,
            sandbox_port: 80,
            protocol: Protocol::Tcp,
        }];
        for (bridge, publish) in [
            (None, &publish[..0]),
            (None, &publish[..]),
            (Some("pc-n01234567"), &publish[..]),
        ] {
            let r = SandboxRules {
                bridge,
                publish,
                ..rules(&id, &a)
            };
            let text = sandbox_ruleset(&r, true);
            let down = teardown_script(&objects_of(&r));
            let added: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("add element inet portcullis_sandboxes "))
                .collect();
            let deleted: Vec<&str> = down
                .lines()
                .filter_map(|l| l.strip_prefix("delete element inet portcullis_sandboxes "))
                .collect();
            assert_eq!(added.len(), deleted.len());
            for (add, del) in added.iter().zip(&deleted) {
                let key = add.split(" : jump ").next().unwrap().trim_end_matches(" }");
                assert_eq!(key, del.trim_end_matches(" }"), "{add} / {del}");
            }
            // Every chain, set and counter named after it, and nothing else.
            for line in text.lines().map(str::trim) {
                for kind in ["chain", "set", "counter"] {
                    if let Some(rest) = line.strip_prefix(&format!("{kind} "))
                        && let Some(name) = rest.split(' ').next()
                        && SandboxId::from_object(name).is_some()
                    {
                        assert!(
                            down.contains(&format!(
                                "delete {kind} inet portcullis_sandboxes {name}\n"
                            )),
                            "{name}"
                        );
                    }
                }
            }
            assert!(!down.contains("forward_from4") || bridge.is_some());
            assert!(!down.contains(" forward\n") && !down.contains("delete table"));
        }
    }

    #[test]
    fn learning_logs_each_new_flow_once_and_lets_it_through() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let text = sandbox_ruleset(
            &SandboxRules {
                learn: true,
                ..rules(&id, &a)
            },
            true,
        );
        let egress = chain(&text, "egress_0a1b2c3d");
        // Anti-spoofing still comes first; then the unlimited log of the first packet.
        let spoof = egress.find("ip6 saddr !=").unwrap();
        let log = egress
            .find("ct mark and 0x100000 == 0 ct mark set ct mark or 0x100000 log group 4242\n")
            .unwrap();
        assert!(spoof < log);
        assert!(egress[log..].contains("\t\treturn\n"));
        // What the host drops is not logged as a flow of the job.
        assert!(!chain(&text, "input_0a1b2c3d").contains("log group"));
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
        let text = sandbox_ruleset(
            &SandboxRules {
                publish: &publish,
                ..rules(&id, &a)
            },
            true,
        );
        let nat_in = chain(&text, "publish_in_0a1b2c3d");
        // No sandbox reaches another's published port, and none has its DNS captured by one.
        assert!(nat_in.contains(r#"iifname "pc-*" return"#));
        assert!(text.contains("type nat hook prerouting priority dstnat - 10;"));
        assert!(nat_in.contains("type nat hook prerouting priority dstnat;"));
        assert!(nat_in.contains(
            "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 dnat ip to 203.0.113.130:80"
        ));
        assert!(!nat_in.contains("ip daddr 127.0.0.1"));
        let nat_local = chain(&text, "publish_local_0a1b2c3d");
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
        assert!(nat_local.contains("type nat hook output priority -100"));
        assert!(text.contains(
            "add element inet portcullis_sandboxes loopback_nat { \"pc-0a1b2c3d-h\" . 203.0.113.130 }"
        ));
        // Only DNATed connections to the published ports pass, in forward and from the host.
        let accept = "ct status dnat ip daddr 203.0.113.130 tcp dport 80 accept";
        assert!(chain(&text, "to_0a1b2c3d").contains(accept));
        let output = chain(&text, "output_0a1b2c3d");
        assert!(output.contains(accept));
        assert!(output.ends_with("counter drop"));
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
        let text = sandbox_ruleset(
            &SandboxRules {
                bridge: Some("pc-n01234567"),
                ..rules(&id, &a)
            },
            true,
        );
        // The sandbox's own link appears nowhere: its packets enter on the bridge.
        assert!(!text.contains("pc-0a1b2c3d-h"), "{text}");
        let el = |map: &str, key: &str, chain: &str| {
            format!(
                "add element inet portcullis_sandboxes {map} {{ \"pc-n01234567\" . {key} : jump {chain}_0a1b2c3d }}\n"
            )
        };
        assert!(text.contains(&el("dns_from4", "203.0.113.194", "dns")));
        assert!(text.contains(&el("forward_from6", "2001:db8:fffe:ff::2", "egress")));
        // The host talks to it, and it to the host, from its link-local address too.
        assert!(text.contains(&el("input_from6", "fe80::70:aff:fe1b:2c3d", "input")));
        assert!(text.contains(&el("output_to6", "fe80::70:aff:fe1b:2c3d", "output")));
        assert!(!text.contains(&el("forward_from6", "fe80::70:aff:fe1b:2c3d", "egress")));
        // Towards the sandbox: other sandboxes of the network (their egress decided), else drop.
        let to = chain(&text, "to_0a1b2c3d");
        let from_peer = to.find(r#"iifname "pc-n01234567" accept"#).unwrap();
        assert!(from_peer < to.find("counter name blocked_0a1b2c3d drop").unwrap());
        assert!(text.contains("own_link4 { 203.0.113.194 . \"pc-n01234567\" }"));
        let net = network_ruleset("portcullis_n01234567", "pc-n01234567");
        assert!(net.contains(r#"oifname "pc-n01234567" icmpv6 type nd-redirect drop"#));
    }

    #[test]
    fn replacing_flushes_every_chain_and_keeps_the_sets() {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let a = addressing();
        let script = sandbox_ruleset(&rules(&id, &a), false);
        let r = replace_chains(&script, SHARED_TABLE);
        for chain in ["dns", "input", "to", "output", "egress"] {
            assert!(
                r.contains(&format!("flush chain inet {SHARED_TABLE} {chain}_{id}\n")),
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
        let text = sandbox_ruleset(&SandboxRules { ..rules(&id, &a) }, true);
        assert!(!text.contains("publish_in") && !text.contains("ct status dnat"));
        assert!(!text.contains("portcullis_sandboxes loopback_nat {"));
        assert!(text.contains("chain output_0a1b2c3d"));
    }

    /// The example of docs/architecture.md: `cargo test -p portcullis-kernel --lib
    /// print_ -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the example of docs/architecture.md"]
    fn print_the_example_of_the_docs() {
        let id = SandboxId::parse("3f9c2a71").unwrap();
        let a = Addressing {
            host4: "10.139.169.197".parse().unwrap(),
            sandbox4: "10.139.169.198".parse().unwrap(),
            prefix4: 30,
            host6: "fd70:6f72:7463:2a71::1".parse().unwrap(),
            sandbox6: "fd70:6f72:7463:2a71::2".parse().unwrap(),
            prefix6: 64,
        };
        let statics = [
            StaticAllow {
                net: "198.51.100.0/24".parse().unwrap(),
                ports: vec![],
            },
            StaticAllow {
                net: "2001:db8::/32".parse().unwrap(),
                ports: vec![(Protocol::Tcp, 443)],
            },
        ];
        let r = SandboxRules {
            relay: RelayPorts {
                udp4: 41533,
                tcp4: 38211,
                udp6: 52907,
                tcp6: 45170,
            },
            statics: &statics,
            nflog_group: 44956,
            ..rules(&id, &a)
        };
        println!("{}", sandbox_ruleset(&r, true));
        println!("{}", teardown_script(&objects_of(&r)));
    }
}
