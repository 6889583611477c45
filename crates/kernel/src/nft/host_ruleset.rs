//! The nftables table of a host-mode run (`portcullis run --host-network`), as `nft -f`
//! text. Pure: no I/O, tested without root.
//!
//! In host mode CMD stays in the invoking network namespace, so its packets are told apart
//! from everyone else's by their socket: by the cgroup v2 group CMD and its descendants live
//! in (`socket cgroupv2`), or, where cgroup v2 is not usable, by the owner of the socket
//! (`meta skuid`, a dedicated user). One table `inet portcullis_<id>` holds the same four
//! dynamic sets as a sandbox (the relay writes them unchanged), a nat `output` chain that
//! sends the group's DNS to the relay on loopback, a filter `output` chain that lets the group
//! reach only what the sets and the CIDR rules opened, and an `input` guard that lets only
//! redirected queries reach the relay. Everything not of the group passes untouched.
//!
//! The same table, with [`Selector::Namespace`], puts a policy on a whole network namespace
//! made by someone else (`portcullis sandbox attach`, a container's): it is written into
//! that namespace, every socket there is the sandbox's, its own loopback stays open, and what
//! it forwards (nested namespaces) meets the same egress filter.

use std::fmt::Write as _;

use crate::names::{
    COUNTER_BLOCKED, SET_ALLOW4, SET_ALLOW4_PORT, SET_ALLOW6, SET_ALLOW6_PORT, SandboxId,
};
use crate::nft::ruleset::{
    LOG_BURST, LOG_RATE_PER_SECOND, StaticAllow, set_declarations, static_accepts,
};

/// Which sockets are CMD's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Sockets created by a process of the cgroup v2 group at `path` (as nft resolves it,
    /// relative to /sys/fs/cgroup), `level` deep below the hierarchy's root.
    Cgroup { path: String, level: u32 },
    /// Sockets owned by user `uid` (the fallback without cgroup v2: a dedicated user).
    Owner { uid: u32 },
    /// Every packet of the namespace the table is in (an attached namespace).
    Namespace,
}

impl Selector {
    /// The rule prefix matching the selected packets, with a trailing space (or nothing).
    fn nft(&self) -> String {
        match self {
            Selector::Cgroup { path, level } => {
                format!("socket cgroupv2 level {level} \"{path}\" ")
            }
            Selector::Owner { uid } => format!("meta skuid {uid} "),
            Selector::Namespace => String::new(),
        }
    }
}

/// The relay's loopback ports: IPv4 always, IPv6 where `::1` could be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRelay {
    pub udp4: u16,
    pub tcp4: u16,
    /// (udp, tcp) on `::1`.
    pub v6: Option<(u16, u16)>,
}

/// Everything the table of one host-mode run depends on.
#[derive(Debug, Clone)]
pub struct HostRules<'a> {
    pub id: &'a SandboxId,
    pub selector: &'a Selector,
    pub relay: HostRelay,
    pub statics: &'a [StaticAllow],
    pub nflog_group: u16,
}

/// The `nft -f` script creating the run's table, applied as one transaction.
pub fn host_ruleset(r: &HostRules<'_>) -> String {
    let table = r.id.table();
    let sel = r.selector.nft();
    let p = r.relay;
    let mut redirect = format!(
        "\t\t{sel}meta nfproto ipv4 udp dport 53 dnat ip to 127.0.0.1:{u4}\n\
         \t\t{sel}meta nfproto ipv4 tcp dport 53 dnat ip to 127.0.0.1:{t4}\n",
        u4 = p.udp4,
        t4 = p.tcp4
    );
    let mut guard = format!(
        "\t\tip daddr 127.0.0.1 udp dport {u4} ct status dnat accept\n\
         \t\tip daddr 127.0.0.1 udp dport {u4} ct state new,untracked drop\n\
         \t\tip daddr 127.0.0.1 tcp dport {t4} ct status dnat accept\n\
         \t\tip daddr 127.0.0.1 tcp dport {t4} ct state new,untracked drop\n",
        u4 = p.udp4,
        t4 = p.tcp4
    );
    let mut to_relay = format!(
        "\t\tip daddr 127.0.0.1 udp dport {u4} ct status dnat accept\n\
         \t\tip daddr 127.0.0.1 tcp dport {t4} ct status dnat accept\n",
        u4 = p.udp4,
        t4 = p.tcp4
    );
    if let Some((u6, t6)) = p.v6 {
        let _ = write!(
            redirect,
            "\t\t{sel}meta nfproto ipv6 udp dport 53 dnat ip6 to [::1]:{u6}\n\
             \t\t{sel}meta nfproto ipv6 tcp dport 53 dnat ip6 to [::1]:{t6}\n"
        );
        let _ = write!(
            guard,
            "\t\tip6 daddr ::1 udp dport {u6} ct status dnat accept\n\
             \t\tip6 daddr ::1 udp dport {u6} ct state new,untracked drop\n\
             \t\tip6 daddr ::1 tcp dport {t6} ct status dnat accept\n\
             \t\tip6 daddr ::1 tcp dport {t6} ct state new,untracked drop\n"
        );
        let _ = write!(
            to_relay,
            "\t\tip6 daddr ::1 udp dport {u6} ct status dnat accept\n\
             \t\tip6 daddr ::1 tcp dport {t6} ct status dnat accept\n"
        );
    }
    let statics = static_accepts(r.statics, "accept");
    // An attached namespace's loopback is its own (its services talking to each other), and
    // it may route for namespaces nested in it: their new flows are filtered alike.
    let (output, forward) = match r.selector {
        // Its kernel's own link chatter too: neighbour discovery (IPv6 reaches nothing
        // without it), router solicitations and MLD on the link, and a DHCP client's lease.
        Selector::Namespace => (
            "\t\toifname \"lo\" accept\n\
             \t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept\n\
             \t\ticmpv6 type { nd-router-solicit, mld-listener-report, mld2-listener-report } ip6 daddr ff02::/16 accept\n\
             \t\tmeta nfproto ipv4 udp sport 68 udp dport 67 accept\n\
             \t\tip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept\n\
             \t\tjump egress\n"
                .to_owned(),
            "\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tjump egress\n\t}\n"
                .to_owned(),
        ),
        _ => (format!("\t\t{sel}jump egress\n"), String::new()),
    };
    format!(
        r#"table inet {table} {{
{sets}
	# Every DNS packet of CMD's, whatever its destination, goes to the relay on loopback.
	chain dns_redirect {{
		type nat hook output priority -110; policy accept;
{redirect}	}}

	# Only queries the redirect brought reach the relay: no other local process can make it
	# open addresses for CMD.
	chain relay_guard {{
		type filter hook input priority filter; policy accept;
{guard}	}}

	chain output {{
		type filter hook output priority filter; policy accept;
{output}	}}
{forward}
	# CMD's egress: replies, queries to the relay, what CIDR rules open; never the host's
	# own addresses by name (as in run, where the host drops what a sandbox sends it); then
	# what DNS answers opened. The rest, the host's loopback services included, is logged
	# and dropped.
	chain egress {{
		ct state established,related accept
{to_relay}{statics}		fib daddr type local limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets log group {g}
		fib daddr type local counter name {COUNTER_BLOCKED} drop
		ip daddr @{SET_ALLOW4} accept
		ip6 daddr @{SET_ALLOW6} accept
		meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @{SET_ALLOW4_PORT} accept
		meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport @{SET_ALLOW6_PORT} accept
		limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets log group {g}
		counter name {COUNTER_BLOCKED} drop
	}}
}}
"#,
        g = r.nflog_group,
        sets = set_declarations(None),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_policy::Protocol;

    fn text(selector: &Selector, v6: bool) -> String {
        let id = SandboxId::parse("0a1b2c3d").unwrap();
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
        host_ruleset(&HostRules {
            id: &id,
            selector,
            relay: HostRelay {
                udp4: 1001,
                tcp4: 1002,
                v6: v6.then_some((1003, 1004)),
            },
            statics: &statics,
            nflog_group: 4242,
        })
    }

    fn chain<'a>(text: &'a str, name: &str) -> &'a str {
        let start = text.find(&format!("chain {name} {{")).unwrap();
        let end = text[start..].find("\n\t}").unwrap();
        &text[start..start + end]
    }

    fn cgroup() -> Selector {
        Selector::Cgroup {
            path: "unified/portcullis-0a1b2c3d".into(),
            level: 1,
        }
    }

    #[test]
    fn every_rule_that_changes_a_packet_is_limited_to_cmds_sockets() {
        let t = text(&cgroup(), true);
        assert!(t.starts_with("table inet portcullis_0a1b2c3d {"));
        let sel = r#"socket cgroupv2 level 1 "unified/portcullis-0a1b2c3d""#;
        let nat = chain(&t, "dns_redirect");
        assert!(nat.contains("type nat hook output priority -110;"));
        let dnats: Vec<&str> = nat.lines().filter(|l| l.contains("dnat")).collect();
        assert_eq!(dnats.len(), 4);
        assert!(dnats.iter().all(|l| l.trim_start().starts_with(sel)));
        assert!(nat.contains(&format!(
            "{sel} meta nfproto ipv4 udp dport 53 dnat ip to 127.0.0.1:1001"
        )));
        assert!(nat.contains(&format!(
            "{sel} meta nfproto ipv6 tcp dport 53 dnat ip6 to [::1]:1004"
        )));
        // The filter base chain does nothing but send CMD's packets to `egress`.
        let out = chain(&t, "output");
        assert!(out.contains("type filter hook output priority filter; policy accept;"));
        assert_eq!(out.lines().count(), 3);
        assert!(out.contains(&format!("{sel} jump egress")));
        // The relay's guard drops only what was not redirected, to the relay's ports only.
        let guard = chain(&t, "relay_guard");
        assert_eq!(guard.matches("ct state new,untracked drop").count(), 4);
        // Accept what the redirect brought, then drop any other new (or untracked) packet.
        let ok = guard
            .find("ip daddr 127.0.0.1 udp dport 1001 ct status dnat accept")
            .unwrap();
        let no = guard
            .find("ip daddr 127.0.0.1 udp dport 1001 ct state new,untracked drop")
            .unwrap();
        assert!(ok < no);
    }

    #[test]
    fn egress_accepts_replies_the_relay_and_what_was_opened_then_drops_the_rest() {
        let t = text(&cgroup(), true);
        let egress = chain(&t, "egress");
        let lines: Vec<&str> = egress.lines().map(str::trim).collect();
        assert_eq!(lines[1], "ct state established,related accept");
        assert!(egress.contains("ip daddr 127.0.0.1 udp dport 1001 ct status dnat accept"));
        assert!(egress.contains("ip6 daddr ::1 tcp dport 1004 ct status dnat accept"));
        assert!(egress.contains("ip daddr @allow4 accept"));
        assert!(egress.contains("ip6 daddr . meta l4proto . th dport @allow6p accept"));
        assert!(egress.contains("ip daddr 198.51.100.0/24 accept"));
        assert!(egress.contains("ip6 daddr 2001:db8::/48 tcp dport 443 accept"));
        // Loopback is no exception: only the relay's ports (redirected) are accepted there.
        assert!(!egress.contains("127.0.0.0/8") && !egress.contains("oif lo"));
        assert_eq!(
            lines[lines.len() - 2],
            "limit rate 200/second burst 200 packets log group 4242"
        );
        assert_eq!(lines[lines.len() - 1], "counter name blocked drop");
    }

    #[test]
    fn an_attached_namespace_is_filtered_whole_with_its_loopback_open() {
        let t = text(&Selector::Namespace, true);
        let nat = chain(&t, "dns_redirect");
        assert!(nat.contains("\t\tmeta nfproto ipv4 udp dport 53 dnat ip to 127.0.0.1:1001"));
        let out = chain(&t, "output");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines[2], "oifname \"lo\" accept");
        assert_eq!(lines.last(), Some(&"jump egress"));
        assert!(out.contains("nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"));
        assert!(out.contains("udp sport 68 udp dport 67 accept"));
        // Nothing else is accepted before the egress filter.
        assert_eq!(lines.iter().filter(|l| l.ends_with("accept")).count(), 5);
        let fwd = chain(&t, "forward");
        assert!(fwd.contains("type filter hook forward priority filter; policy accept;"));
        assert!(fwd.trim_end().ends_with("jump egress"));
        assert!(!t.contains("cgroupv2") && !t.contains("skuid"));
    }

    #[test]
    fn owner_fallback_and_ipv4_only_relay() {
        let t = text(&Selector::Owner { uid: 1234 }, false);
        assert!(!t.contains("cgroupv2"));
        assert!(chain(&t, "output").contains("meta skuid 1234 jump egress"));
        assert!(
            chain(&t, "dns_redirect").contains(
                "meta skuid 1234 meta nfproto ipv4 tcp dport 53 dnat ip to 127.0.0.1:1002"
            )
        );
        // Without a relay on ::1 nothing is redirected over IPv6: CMD's IPv6 queries meet
        // the final drop.
        assert!(!t.contains("::1"));
        assert!(!t.contains("nfproto ipv6"));
    }
}
